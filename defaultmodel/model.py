"""Architecture of the default model: Wan denoiser config, pixel<->latent packing, scheduler.

There is no learned autoencoder: the "latent" of a frame is its exact space-to-depth
rearrangement (32x32x3 -> 16x16x12), which is lossless and invertible, so the diffusion
model works in pixel space while keeping Wan's (1, 2, 2)-patch token layout:
8 frames x 8 x 8 = 512 tokens.

The transformer sees three more input channels than it predicts: the frame index, row and
column of every latent pixel (:func:`with_positions`). Wan's only position signal is RoPE,
which is relative, so a model that sees nothing but noise cannot put an object at the left
of the first frame; caption words about motion could then act only through relations
between frames, and 6,000 training steps without these channels taught it none (its loss
was the same with the opposite direction word). The pipeline concatenates them the way
Wan's image-to-video pipeline concatenates its image condition to the noisy latents.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from .text import TinyTextEncoder, WordTokenizer

#: Exact WanTransformer3DModel configuration of the shipped model.
WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 12 + 3,  # latents + position channels
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
#: Channels of the space-to-depth latents (what the transformer predicts).
LATENT_CHANNELS = 3 * PACK * PACK
#: Conditioning channels appended to the latents: frame index, row, column.
POSITION_CHANNELS = WAN_CONFIG["in_channels"] - LATENT_CHANNELS


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


def position_channels(latents: torch.Tensor) -> torch.Tensor:
    """``[B, 3, F, H, W]`` frame index, row and column of each latent pixel, each spanning [-1, 1]."""
    b, _, f, h, w = latents.shape
    axes = [torch.linspace(-1.0, 1.0, n, device=latents.device, dtype=latents.dtype) for n in (f, h, w)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.unsqueeze(0).expand(b, -1, -1, -1, -1)


def with_positions(latents: torch.Tensor) -> torch.Tensor:
    """The transformer's input: ``latents`` with :func:`position_channels` appended."""
    return torch.cat([latents, position_channels(latents)], dim=1)
