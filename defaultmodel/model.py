"""Architecture of the default model: Wan denoiser config, pixel<->latent packing, scheduler.

There is no learned autoencoder: the "latent" of a frame is its exact space-to-depth
rearrangement (32x32x3 -> 16x16x12), which is lossless and invertible, so the diffusion
model works in pixel space while keeping Wan's 12-channel, (1, 2, 2)-patch token layout:
8 frames x 8 x 8 = 512 tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from .text import WordTokenizer, TinyTextEncoder

#: Exact WanTransformer3DModel configuration of the shipped model.
WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 12,
    "out_channels": 12,
    "text_dim": 128,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

#: Side of the space-to-depth block.
PACK = 2


def build_transformer() -> WanTransformer3DModel:
    """A freshly initialised denoiser with :data:`WAN_CONFIG`."""
    return WanTransformer3DModel(**WAN_CONFIG)


def build_text_encoder(tokenizer: WordTokenizer) -> TinyTextEncoder:
    """A freshly initialised text encoder matching ``tokenizer`` and the denoiser's text_dim."""
    return TinyTextEncoder(
        vocab_size=tokenizer.vocab_size,
        max_length=tokenizer.max_length,
        width=WAN_CONFIG["text_dim"],
        pad_id=tokenizer.pad_id,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler sampler; shift 1 matches the unshifted training noise levels."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def pixels_to_latents(video: torch.Tensor) -> torch.Tensor:
    """Space-to-depth: ``[B, C, F, H, W]`` -> ``[B, 4C, F, H/2, W/2]`` (exact, invertible)."""
    b, c, f, h, w = video.shape
    x = video.reshape(b, c, f, h // PACK, PACK, w // PACK, PACK)
    x = x.permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * PACK * PACK, f, h // PACK, w // PACK)


def latents_to_pixels(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pixels_to_latents`."""
    b, c4, f, h, w = latents.shape
    c = c4 // (PACK * PACK)
    x = latents.reshape(b, c, PACK, PACK, f, h, w)
    x = x.permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, f, h * PACK, w * PACK)
