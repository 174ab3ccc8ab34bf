"""Tiny random-weight configs of the real diffusers video transformers, and inputs to call them step by step.

Each entry builds the real architecture (so adapters are tested against diffusers' own classes) at a size that
runs in milliseconds on a CPU. `make_inputs` returns keyword arguments for one transformer call, including the
batch layout the model's pipeline uses (batched CFG models get a batch of 2: uncond, cond).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    SkyReelsV2Transformer3DModel,
    WanTransformer3DModel,
)


def tiny_wan(num_layers: int = 3) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        rope_max_seq_len=32,
    )


def tiny_skyreels() -> SkyReelsV2Transformer3DModel:
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=3,
        rope_max_seq_len=32,
    )


def tiny_cogvideox() -> CogVideoXTransformer3DModel:
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=3,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    )


def tiny_hunyuan() -> HunyuanVideoTransformer3DModel:
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    )


def tiny_ltx() -> LTXVideoTransformer3DModel:
    return LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=3,
        caption_channels=16,
    )


def tiny_mochi() -> MochiTransformer3DModel:
    return MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        pooled_projection_dim=16,
        in_channels=4,
        out_channels=4,
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=8,
    )


def _bcfhw_inputs(
    batch: int, channels: int, frames: int, size: int, text_dim: int, text_len: int = 8
) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, channels, frames, size, size),
        "encoder_hidden_states": torch.randn(batch, text_len, text_dim),
    }


def make_inputs(name: str, generator_seed: int = 0) -> Callable[[float], dict[str, Any]]:
    """A function timestep -> forward kwargs for one call of the named tiny model (fixed random tensors)."""
    torch.manual_seed(generator_seed)
    if name in ("wan", "skyreels_v2"):
        base = _bcfhw_inputs(1, 4, 3, 8, 16)
        return lambda t: {**base, "timestep": torch.tensor([t]), "return_dict": False}
    if name == "cogvideox":
        base = {"hidden_states": torch.randn(2, 3, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 8, 16)}
        return lambda t: {**base, "timestep": torch.tensor([t, t]), "return_dict": False}
    if name == "hunyuan_video":
        base = {
            **_bcfhw_inputs(1, 4, 2, 4, 16),
            "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool),
            "pooled_projections": torch.randn(1, 8),
            "guidance": torch.tensor([3500.0]),
        }
        return lambda t: {**base, "timestep": torch.tensor([t]), "return_dict": False}
    if name == "ltx_video":
        base = {
            "hidden_states": torch.randn(2, 2 * 4 * 4, 8),
            "encoder_hidden_states": torch.randn(2, 8, 16),
            "encoder_attention_mask": torch.ones(2, 8, dtype=torch.bool),
            "num_frames": 2,
            "height": 4,
            "width": 4,
        }
        return lambda t: {**base, "timestep": torch.tensor([t, t]), "return_dict": False}
    if name == "mochi":
        base = {**_bcfhw_inputs(2, 4, 2, 8, 16), "encoder_attention_mask": torch.ones(2, 8, dtype=torch.bool)}
        return lambda t: {**base, "timestep": torch.tensor([t, t]), "return_dict": False}
    raise KeyError(name)


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "wan": tiny_wan,
    "skyreels_v2": tiny_skyreels,
    "cogvideox": tiny_cogvideox,
    "hunyuan_video": tiny_hunyuan,
    "ltx_video": tiny_ltx,
    "mochi": tiny_mochi,
}


def run_steps(model: torch.nn.Module, name: str, timesteps: list[float], branch: str = "cond") -> torch.Tensor:
    """Call the transformer once per timestep inside `cache_context(branch)`, feeding back a simple Euler update.

    Returns the final latent, so a change in any step's output changes the result.
    """
    make = make_inputs(name)
    latent = None
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            kwargs = make(t)
            if latent is not None:
                kwargs["hidden_states"] = latent
            with model.cache_context(branch, step_index=i, num_inference_steps=len(timesteps)):
                out = model(**kwargs)[0]
            latent = kwargs["hidden_states"] + 0.1 * out.reshape(kwargs["hidden_states"].shape)
    return latent
