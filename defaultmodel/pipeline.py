"""``TinyVideoPipeline``: text-to-video sampling with the default model, Wan-style.

The denoising loop mirrors diffusers' ``WanPipeline``: the conditional and unconditional
branches are separate transformer calls, each inside
``transformer.cache_context("cond" | "uncond", step_index=..., sigma=..., num_inference_steps=...)``
so diffusers' cache hooks and this project's runtime can keep per-branch state. As in Wan's
image-to-video pipeline, the transformer's input is the noisy latents with conditioning
channels appended (here the position channels of :func:`dit_accel.defaultmodel.model.with_positions`);
it predicts the latents' channels only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from .data import HEIGHT, NUM_FRAMES, WIDTH
from .model import (
    PACK,
    POSITION_CHANNELS,
    build_scheduler,
    build_text_encoder,
    build_transformer,
    latents_to_pixels,
    with_positions,
)
from .text import TinyTextEncoder, WordTokenizer

OUTPUT_TYPES = ("np", "pt", "latent")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _load_model(cls: type[ModelMixin], folder: Path, dtype: torch.dtype | None) -> ModelMixin:
    """Build ``cls`` from ``folder/config.json``, load its safetensors weights strictly, cast.

    Done by hand because diffusers' ``from_pretrained`` needs ``accelerate`` for models with
    fp32-pinned modules (Wan), and nothing here may touch the network. Like diffusers, the
    class's ``_keep_in_fp32_modules`` stay in float32 when casting to a lower precision.
    """
    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(load_file(folder / WEIGHTS_NAME), strict=True)
    if dtype is not None:
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model.eval()


@dataclass
class TinyVideoPipelineOutput(BaseOutput):
    """``frames``: ``[B, F, H, W, 3]`` array ("np"), ``[B, F, 3, H, W]`` tensor ("pt"),
    both in [0, 1], or the raw ``[B, 12, F, H/2, W/2]`` latents ("latent")."""

    frames: np.ndarray | torch.Tensor


class TinyVideoPipeline(DiffusionPipeline):
    """Text-to-video pipeline of the embedded default model (Wan transformer, pixel space)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: TinyTextEncoder,
        tokenizer: WordTokenizer,
    ) -> None:
        super().__init__()
        in_channels, out_channels = transformer.config.in_channels, transformer.config.out_channels
        if in_channels != out_channels + POSITION_CHANNELS:
            raise ValueError(
                f"transformer takes {in_channels} input channels for {out_channels} output channels; "
                f"this pipeline appends {POSITION_CHANNELS} position channels, so it needs "
                f"in_channels = out_channels + {POSITION_CHANNELS}"
            )
        self.register_modules(
            transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )

    @classmethod
    def from_scratch(cls) -> TinyVideoPipeline:
        """A randomly initialised pipeline with the shipped architecture (for export and tests)."""
        tokenizer = WordTokenizer.from_package()
        transformer, text_encoder = build_transformer().eval(), build_text_encoder(tokenizer).eval()
        return cls(transformer, build_scheduler(), text_encoder, tokenizer)

    def save_pretrained(self, save_directory: str | os.PathLike, **_: object) -> None:
        """Write every component to its subfolder (safetensors weights) plus ``model_index.json``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.save_config(folder)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **_: object
    ) -> TinyVideoPipeline:
        """Load a folder written by :meth:`save_pretrained`; local files only, never the hub."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / cls.config_name).is_file():
            raise FileNotFoundError(f"{folder} is not a saved TinyVideoPipeline (no {cls.config_name})")
        return cls(
            transformer=_load_model(WanTransformer3DModel, folder / "transformer", torch_dtype),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            text_encoder=_load_model(TinyTextEncoder, folder / "text_encoder", torch_dtype),
            tokenizer=WordTokenizer.from_pretrained(folder / "tokenizer"),
        )

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None) -> torch.Tensor:
        """``[B, L, text_dim]`` embeddings of ``prompt`` in the transformer's dtype."""
        device = device or self._execution_device
        ids = self.tokenizer(prompt).to(device)
        return self.text_encoder(ids).to(self.transformer.dtype)

    def _embeddings(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str],
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_videos_per_prompt: int,
        need_negative: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resolve prompts or precomputed embeddings into per-video cond/uncond embeddings."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt)
        batch = prompt_embeds.shape[0]
        if need_negative and negative_prompt_embeds is None:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
            if len(negatives) != batch:
                raise ValueError(f"got {len(negatives)} negative prompts for {batch} prompts")
            negative_prompt_embeds = self.encode_prompt(negatives)
        dtype, device = self.transformer.dtype, self._execution_device
        prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(num_videos_per_prompt, 0)
        if need_negative:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, 0)
        return prompt_embeds, negative_prompt_embeds if need_negative else None

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the transformer is called with for noisy ``latents``: the position channels appended, its dtype."""
        return with_positions(latents).to(self.transformer.dtype)

    def _decode(self, latents: torch.Tensor, output_type: str) -> np.ndarray | torch.Tensor:
        """Turn final latents into the requested output type."""
        if output_type == "latent":
            return latents
        video = ((latents_to_pixels(latents.float()) + 1) / 2).clamp(0, 1)
        if output_type == "pt":
            return video.permute(0, 2, 1, 3, 4)
        return video.permute(0, 2, 3, 4, 1).cpu().numpy()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] = "",
        num_frames: int = NUM_FRAMES,
        height: int = HEIGHT,
        width: int = WIDTH,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> TinyVideoPipelineOutput | tuple:
        """Generate videos; CFG runs as separate "cond"/"uncond" calls when guidance_scale > 1."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if height % (2 * PACK) or width % (2 * PACK):
            raise ValueError(f"height and width must be multiples of {2 * PACK}")
        use_cfg = guidance_scale > 1.0
        cond, uncond = self._embeddings(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_videos_per_prompt, use_cfg
        )
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.scheduler.set_begin_index(0)
        if latents is None:
            shape = (cond.shape[0], self.transformer.config.out_channels, num_frames, height // PACK, width // PACK)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device, torch.float32)

        for i, t in enumerate(self.progress_bar(timesteps)):
            context = {"step_index": i, "sigma": float(self.scheduler.sigmas[i]), "num_inference_steps": len(timesteps)}
            model_input, timestep = self.model_input(latents), t.expand(latents.shape[0])
            with self.transformer.cache_context("cond", **context):
                noise_pred = self.transformer(model_input, timestep, cond, return_dict=False)[0]
            if use_cfg:
                with self.transformer.cache_context("uncond", **context):
                    noise_uncond = self.transformer(model_input, timestep, uncond, return_dict=False)[0]
                noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
            latents = self.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]

        frames = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return TinyVideoPipelineOutput(frames=frames)
