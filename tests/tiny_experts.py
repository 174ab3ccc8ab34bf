"""Tiny Wan 2.2 two-expert pipelines (`transformer` + `transformer_2`, switching at `boundary_ratio`), text-to-video
and image-to-video (A14B style: no image encoder), built from the tiny parts in `tiny_models`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from tiny_models import _t5_encoder, tiny_tokenizer, tiny_wan, wan_vae

#: Share of the timesteps `transformer` serves before `transformer_2` takes over (A14B T2V uses 0.875, I2V 0.9);
#: 0.75 splits a tiny run of 6 steps (shift 3) into two runs of 3 steps.
BOUNDARY_RATIO = 0.75
#: Video size keywords the tiny Wan VAE and patching accept.
SIZE = {"num_frames": 5, "height": 32, "width": 32}


def _experts(in_channels: int) -> tuple[WanTransformer3DModel, WanTransformer3DModel]:
    """Two experts of one config with different random weights."""
    config = {**tiny_wan().config, "in_channels": in_channels, "out_channels": 4}
    return WanTransformer3DModel(**config).eval(), WanTransformer3DModel(**config).eval()


def wan22_t2v_pipeline() -> Any:
    """Wan 2.2 text-to-video with two experts."""
    high, low = _experts(4)
    return WanPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16, umt5=True),
        vae=wan_vae(),
        transformer=high,
        transformer_2=low,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        boundary_ratio=BOUNDARY_RATIO,
    )


def wan22_i2v_pipeline() -> Any:
    """Wan 2.2 image-to-video with two experts and no image encoder: the experts take the noisy latent, the frame
    mask (4 channels) and the encoded conditioning image (4 channels)."""
    high, low = _experts(12)
    return WanImageToVideoPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16, umt5=True),
        vae=wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=high,
        transformer_2=low,
        boundary_ratio=BOUNDARY_RATIO,
    )


def save_expert_pipeline(build: Any, folder: Any) -> Any:
    """Build a tiny two-expert pipeline with seeded random weights and `save_pretrained` it into `folder`."""
    torch.manual_seed(0)
    build().save_pretrained(folder)
    return folder
