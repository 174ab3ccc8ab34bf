"""Tiny random-weight configs of the real diffusers video transformers, and inputs to call them step by step.

Each entry builds the real architecture (so adapters are tested against diffusers' own classes) at a size that
runs in milliseconds on a CPU. `make_inputs` returns keyword arguments for one transformer call, including the
batch layout the model's pipeline uses (batched CFG models get a batch of 2: uncond, cond).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    QwenImageTransformer2DModel,
    SanaVideoTransformer3DModel,
    SkyReelsV2Transformer3DModel,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
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


def tiny_wan_vace() -> WanVACETransformer3DModel:
    """Wan VACE with control hints after blocks 0 and 1 (of 3), so a span over blocks 0-2 crosses two of them.

    72 control channels: what the VACE pipeline builds from a 4-channel Wan VAE (2 × 4 latent + 8 × 8 mask)."""
    return WanVACETransformer3DModel(**{**tiny_wan().config, "vace_layers": [0, 1], "vace_in_channels": 72})


def tiny_flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_qwen_image() -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_hunyuan15() -> HunyuanVideo15Transformer3DModel:
    return HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(2, 2, 4),
        task_type="t2v",
    )


def tiny_ltx2() -> LTX2VideoTransformer3DModel:
    return LTX2VideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=3,
        caption_channels=16,
    )


def tiny_sana_video() -> SanaVideoTransformer3DModel:
    return SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
        patch_size=(1, 2, 2),
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
    return _new_family_inputs(name)


def _new_family_inputs(name: str) -> Callable[[float], dict[str, Any]]:
    """`make_inputs` of the families added after the first six (one call, cond branch, except batched CFG)."""
    if name == "wan_vace":
        base = {**_bcfhw_inputs(1, 4, 3, 8, 16), "control_hidden_states": torch.randn(1, 72, 3, 8, 8)}
        return lambda t: {**base, "timestep": torch.tensor([t]), "return_dict": False}
    if name == "flux":
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        base = {
            "hidden_states": torch.randn(1, 16, 16),
            "encoder_hidden_states": torch.randn(1, 8, 16),
            "pooled_projections": torch.randn(1, 8),
            "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
            "txt_ids": torch.zeros(8, 3),
            "guidance": torch.tensor([3.5]),
        }
        return lambda t: {**base, "timestep": torch.tensor([t / 1000]), "return_dict": False}
    if name == "qwen_image":
        base = {
            "hidden_states": torch.randn(1, 16, 16),
            "encoder_hidden_states": torch.randn(1, 8, 16),
            "encoder_hidden_states_mask": torch.ones(1, 8),
            "img_shapes": [[(1, 4, 4)]],
        }
        return lambda t: {**base, "timestep": torch.tensor([t / 1000]), "return_dict": False}
    if name == "hunyuan_video15":
        base = {
            **_bcfhw_inputs(1, 4, 2, 4, 16),
            "encoder_attention_mask": torch.ones(1, 8),
            "encoder_hidden_states_2": torch.randn(1, 6, 8),
            "encoder_attention_mask_2": torch.ones(1, 6),
            "image_embeds": torch.zeros(1, 4, 8),
        }
        return lambda t: {**base, "timestep": torch.tensor([t]), "return_dict": False}
    if name == "ltx2":
        base = {
            "hidden_states": torch.randn(2, 2 * 4 * 4, 8),
            "audio_hidden_states": torch.randn(2, 5, 4),
            "encoder_hidden_states": torch.randn(2, 8, 16),
            "audio_encoder_hidden_states": torch.randn(2, 8, 16),
            "encoder_attention_mask": torch.ones(2, 8),
            "audio_encoder_attention_mask": torch.ones(2, 8),
            "num_frames": 2,
            "height": 4,
            "width": 4,
            "audio_num_frames": 5,
        }
        return lambda t: {**base, "timestep": torch.tensor([t, t]) / 1000, "return_dict": False}
    if name == "sana_video":
        base = _bcfhw_inputs(2, 4, 2, 8, 16)
        return lambda t: {**base, "timestep": torch.tensor([t, t]), "return_dict": False}
    raise KeyError(name)


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "wan": tiny_wan,
    "skyreels_v2": tiny_skyreels,
    "cogvideox": tiny_cogvideox,
    "hunyuan_video": tiny_hunyuan,
    "ltx_video": tiny_ltx,
    "mochi": tiny_mochi,
    "wan_vace": tiny_wan_vace,
    "flux": tiny_flux,
    "qwen_image": tiny_qwen_image,
    "hunyuan_video15": tiny_hunyuan15,
    "ltx2": tiny_ltx2,
    "sana_video": tiny_sana_video,
}


def _branch_context(model: torch.nn.Module, branch: str, step: int, steps: int) -> Any:
    """The model's `cache_context` for one call; none for models without one (SanaVideo's pipeline names no
    branches, so its calls run in the runtime's default branch)."""
    if not hasattr(model, "cache_context"):
        return contextlib.nullcontext()
    return model.cache_context(branch, step_index=step, num_inference_steps=steps)


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
            with _branch_context(model, branch, i, len(timesteps)):
                out = model(**kwargs)[0]
            latent = kwargs["hidden_states"] + 0.1 * out.reshape(kwargs["hidden_states"].shape)
    return latent


# -- whole pipelines -------------------------------------------------------------------------------------------------
# Tiny random-weight pipelines of each supported family, with a word-level tokenizer and a one- or two-layer text
# encoder built here (no download), so prompts go through the pipeline's own text path as a user's would.

PIPELINE_WORDS = (
    "a an the red green blue yellow white black large small circle square triangle moves right left up down stands "
    "still on background and of video"
).split()


def tiny_tokenizer(max_length: int = 512) -> Any:
    """A word-level fast tokenizer over `PIPELINE_WORDS` (unknown words map to `<unk>`), padded with `<pad>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "</s>", "<s>", *PIPELINE_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=max_length,
    )


def _t5_encoder(dim: int, umt5: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(PIPELINE_WORDS) + 4,
        d_model=dim,
        d_kv=4,
        d_ff=2 * dim,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=2,
    )
    return model_cls(config).eval()


def _clip_encoder() -> torch.nn.Module:
    """A one-layer CLIP text encoder of width 8 (HunyuanVideo's and Flux's pooled text embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(PIPELINE_WORDS) + 4,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=2,
    )
    return CLIPTextModel(config).eval()


def wan_vae() -> torch.nn.Module:
    """A Wan VAE of a few channels (also Wan I2V's and SkyReels-V2's)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )


def cogvideox_vae() -> torch.nn.Module:
    """A CogVideoX VAE of a few channels."""
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )


def ltx_vae() -> torch.nn.Module:
    """An LTX-Video VAE of a few channels."""
    from diffusers import AutoencoderKLLTXVideo

    return AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5,
        decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )


def _wan_pipeline() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16, umt5=True),
        vae=wan_vae(),
        transformer=tiny_wan().eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _skyreels_pipeline() -> Any:
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    return SkyReelsV2Pipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16, umt5=True),
        vae=wan_vae(),
        transformer=tiny_skyreels().eval(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )


def _cogvideox_pipeline() -> Any:
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    transformer = CogVideoXTransformer3DModel(
        **{**tiny_cogvideox().config, "max_text_seq_length": 226, "sample_frames": 9}
    ).eval()
    vae = cogvideox_vae()
    return CogVideoXPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def _ltx_pipeline() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    vae = ltx_vae()
    return LTXPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16),
        vae=vae,
        transformer=tiny_ltx().eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _hunyuan_pipeline() -> Any:
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    vocab = len(PIPELINE_WORDS) + 4
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=3,
            eos_token_id=2,
        )
    ).eval()
    clip = _clip_encoder()
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8,) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=tiny_tokenizer(),
        transformer=tiny_hunyuan().eval(),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip,
        tokenizer_2=tiny_tokenizer(77),
    )


def _mochi_pipeline() -> Any:
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    # The pipeline hard-codes Mochi's 12 latent channels.
    config = {**tiny_mochi().config, "max_sequence_length": 256, "in_channels": 12, "out_channels": 12}
    transformer = MochiTransformer3DModel(**config).eval()
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32,) * 4,
        decoder_block_out_channels=(32,) * 4,
        layers_per_block=(1,) * 5,
        latents_mean=(0.0,) * 12,
        latents_std=(1.0,) * 12,
    )
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(16),
        tokenizer=tiny_tokenizer(),
        transformer=transformer,
    )


def _wan_vace_pipeline() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    return WanVACEPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16, umt5=True),
        vae=wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_vace().eval(),
    )


def _flux_pipeline() -> Any:
    """Flux with a 4-channel VAE (the transformer takes 2×2-packed latents: 16 channels) and guidance embedding."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        shift_factor=0.0,
        scaling_factor=1.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_clip_encoder(),
        tokenizer=tiny_tokenizer(77),
        text_encoder_2=_t5_encoder(16),
        tokenizer_2=tiny_tokenizer(),
        transformer=tiny_flux().eval(),
    )


def _sana_video_pipeline() -> Any:
    from diffusers import DPMSolverMultistepScheduler, SanaVideoPipeline
    from transformers import Gemma2Config, Gemma2Model

    gemma = Gemma2Model(
        Gemma2Config(
            vocab_size=len(PIPELINE_WORDS) + 4,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=3,
            eos_token_id=2,
        )
    ).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SanaVideoPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=gemma,
        vae=wan_vae(),
        transformer=tiny_sana_video().eval(),
        scheduler=scheduler,
    )


def tiny_wan_i2v_pipeline() -> Any:
    """A Wan image-to-video pipeline without image encoder (as Wan 2.2's I2V runs): the transformer takes the noisy
    latent, the frame mask (4 channels) and the encoded conditioning image (4 channels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    transformer = WanTransformer3DModel(**{**tiny_wan().config, "in_channels": 12, "out_channels": 4}).eval()
    return WanImageToVideoPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5_encoder(16, umt5=True),
        vae=wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


TINY_PIPELINES: dict[str, Callable[[], Any]] = {
    "wan": _wan_pipeline,
    "skyreels_v2": _skyreels_pipeline,
    "cogvideox": _cogvideox_pipeline,
    "hunyuan_video": _hunyuan_pipeline,
    "ltx_video": _ltx_pipeline,
    "mochi": _mochi_pipeline,
    "wan_vace": _wan_vace_pipeline,
    "flux": _flux_pipeline,
    "sana_video": _sana_video_pipeline,
}

#: Video size keywords per family: small sizes each pipeline's VAE and patching accept with 2+ latent frames and
#: 2×2+ tokens per frame (the planner's foreground labels need more than one token).
PIPELINE_SIZES: dict[str, dict[str, int]] = {
    "wan": {"num_frames": 5, "height": 32, "width": 32},
    "skyreels_v2": {"num_frames": 5, "height": 32, "width": 32},
    "cogvideox": {"num_frames": 9, "height": 16, "width": 16},
    "hunyuan_video": {"num_frames": 5, "height": 32, "width": 32},
    "ltx_video": {"num_frames": 9, "height": 32, "width": 32},
    "mochi": {"num_frames": 7, "height": 32, "width": 32},
    "wan_vace": {"num_frames": 5, "height": 32, "width": 32},
    "flux": {"height": 16, "width": 16},
    "sana_video": {"frames": 5, "height": 32, "width": 32},  # SanaVideo names its frame count `frames`
}

#: Further pipeline keywords per family (a prompt's `extra`): SanaVideo snaps sizes to the bins of its full-size
#: checkpoints unless told not to.
PIPELINE_EXTRA: dict[str, dict[str, Any]] = {"sana_video": {"use_resolution_binning": False}}


def save_tiny_pipeline(name: str, folder: Any) -> Any:
    """Build the named tiny pipeline with seeded random weights and `save_pretrained` it into `folder`."""
    torch.manual_seed(0)
    TINY_PIPELINES[name]().save_pretrained(folder)
    return folder


def count_computed(transformer: torch.nn.Module) -> tuple[list[int], list[int], list]:
    """Independent counters: per block, how many times its first attention module runs; the transformer's calls; and
    the hook handles to remove."""
    from dit_accel.runtime import get_adapter

    adapter = get_adapter(transformer)
    counts = [0] * len(adapter.block_ids(transformer))
    calls = [0]
    handles = [transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))]
    for index, (_, block, _) in enumerate(adapter.iter_blocks(transformer)):

        def bump(*_, index=index):
            counts[index] += 1

        handles.append(getattr(block, adapter.attention[0].attr).register_forward_pre_hook(bump))
    return counts, calls, handles
