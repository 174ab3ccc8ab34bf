"""Tiny random-weight Cosmos pipelines, built without any download (`tests/test_cosmos.py`).

Cosmos pipelines refuse to run without a safety checker, and diffusers' `CosmosSafetyChecker` needs the
`cosmos_guardrail` package, which this install does not have. `PassThroughSafetyChecker` stands in for it, as
diffusers' own Cosmos tests do with theirs: it passes every prompt and returns every video unchanged. A folder saved
with it names this module in `model_index.json`, so loading it needs this module importable (tests/ is on the path).

The transformers are built with `concat_padding_mask=False` unless asked: the padding mask is resized with
`torchvision`, which the install does not bring either (real Cosmos checkpoints set it, so they need `torchvision`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import CosmosTransformer3DModel
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from tiny_models import _t5_encoder, tiny_tokenizer, wan_vae


class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
    """A safety checker that lets everything through (the pipelines call `check_text_safety`, `check_video_safety`
    and move it between devices)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))  # something to save, so the folder loads back

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames


def tiny_cosmos(
    in_channels: int = 4, num_layers: int = 3, concat_padding_mask: bool = False
) -> CosmosTransformer3DModel:
    return CosmosTransformer3DModel(
        in_channels=in_channels,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits a head into t/h/w thirds of at least 4
        num_layers=num_layers,
        mlp_ratio=2.0,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=concat_padding_mask,
        extra_pos_embed_type="learnable",
    )


def cosmos2_text_to_image_pipeline(concat_padding_mask: bool = False) -> Any:
    """Cosmos-Predict2's text-to-image pipeline: a Wan VAE, flow-matching Euler steps, CFG as two unnamed calls."""
    from diffusers import Cosmos2TextToImagePipeline, FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, shift=1.0, use_dynamic_shifting=False)
    return Cosmos2TextToImagePipeline(
        text_encoder=_t5_encoder(16),
        tokenizer=tiny_tokenizer(),
        transformer=tiny_cosmos(concat_padding_mask=concat_padding_mask).eval(),
        vae=wan_vae(),
        scheduler=scheduler,
        safety_checker=PassThroughSafetyChecker(),
    )


def cosmos2_video_to_world_pipeline() -> Any:
    """Cosmos-Predict2's video-to-world pipeline: the text-to-image one's parts, conditioned on a first image whose
    latent frame the pipeline marks in a mask channel it appends (a transformer of 4 + 1 input channels)."""
    from diffusers import Cosmos2VideoToWorldPipeline, FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, shift=1.0, use_dynamic_shifting=False)
    return Cosmos2VideoToWorldPipeline(
        text_encoder=_t5_encoder(16),
        tokenizer=tiny_tokenizer(),
        transformer=tiny_cosmos(in_channels=5).eval(),
        vae=wan_vae(),
        scheduler=scheduler,
        safety_checker=PassThroughSafetyChecker(),
    )


def cosmos_text_to_world_pipeline() -> Any:
    """Cosmos 1's text-to-world pipeline: its own VAE (Haar-wavelet patching, 4× spatial and temporal compression
    here) and EDM Euler steps, CFG as two unnamed calls."""
    from diffusers import AutoencoderKLCosmos, CosmosTextToWorldPipeline, EDMEulerScheduler

    vae = AutoencoderKLCosmos(
        latent_channels=4,
        encoder_block_out_channels=(8, 8),
        decode_block_out_channels=(8, 8),
        attention_resolutions=(),
        resolution=32,
        num_layers=1,
        patch_size=2,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        latents_mean=None,
        latents_std=None,
    )
    scheduler = EDMEulerScheduler(sigma_data=0.5, sigma_schedule="karras", final_sigmas_type="sigma_min")
    return CosmosTextToWorldPipeline(
        text_encoder=_t5_encoder(16),
        tokenizer=tiny_tokenizer(),
        transformer=tiny_cosmos().eval(),
        vae=vae,
        scheduler=scheduler,
        safety_checker=PassThroughSafetyChecker(),
    )


#: Image size keywords of the tiny text-to-image pipeline (2×2 latent tokens after the VAE's 8× and the 2× patch).
COSMOS_SIZE = {"height": 32, "width": 32}


def save_tiny_cosmos(folder: Any) -> Any:
    """Build the tiny text-to-image pipeline with seeded random weights and `save_pretrained` it into `folder`."""
    torch.manual_seed(0)
    cosmos2_text_to_image_pipeline().save_pretrained(folder)
    return folder
