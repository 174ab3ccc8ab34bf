"""The pipelines the bench runs, and one seeded generation on them.

Three sources: the embedded default model (`model=None`), a local pipeline folder (any model `dit_accel.runtime` has an
adapter for), or `--random-config wan-1.3b`: Wan2.1-T2V-1.3B's full-size architecture with random weights, for
speed-only runs on a GPU. Random weights make every fidelity number meaningless, and the bench says so; such a
pipeline has no text encoder, so every prompt becomes seeded random text embeddings of the shape Wan's umT5 gives.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_accel.harness.pipelines import first_video, generate, load_pipeline, torch_dtype
from dit_accel.harness.prompts import PromptSpec
from dit_accel.runtime.adapters import find_transformer

from .errors import BenchError

#: diffusers' WanTransformer3DModel config of Wan2.1-T2V-1.3B (30 blocks, width 1536, 12 heads of 128).
WAN_1_3B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
#: Text tokens Wan's pipeline pads umT5 embeddings to.
WAN_TEXT_TOKENS = 512
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {"wan-1.3b": WAN_1_3B_CONFIG}


@dataclass
class BenchModel:
    """A loaded pipeline and what the report must say about it.

    `text_shape` is (tokens, width) of the random prompt embeddings fed instead of text (random configs only).
    """

    pipe: Any
    name: str
    weights: dict[str, Any]
    fidelity_meaningful: bool = True
    text_shape: tuple[int, int] | None = None

    @property
    def transformer(self) -> torch.nn.Module:
        return find_transformer(self.pipe)


def load_model(model: str | None, random_config: str | None, device: str, dtype: str) -> BenchModel:
    """The pipeline to benchmark: the default model, a local folder, or a random-weight architecture."""
    if random_config is not None:
        return _random_model(random_config, device, torch_dtype(dtype))
    if model is None:
        from dit_accel.defaultmodel import WEIGHTS_DIR

        pipe = load_pipeline(None, device=device, dtype=dtype)
        return BenchModel(pipe, "default model (defaultmodel/weights)", weights_info(WEIGHTS_DIR))
    folder = Path(model)
    pipe = load_pipeline(str(folder), device=device, dtype=dtype)
    return BenchModel(pipe, f"{type(pipe).__name__} from {folder}", weights_info(folder))


def weights_info(folder: Path) -> dict[str, Any]:
    """Which transformer weights were measured: each safetensors file with its size and modification time (UTC)."""
    files = sorted((folder / "transformer").glob("*.safetensors")) or sorted(folder.glob("**/*.safetensors"))
    return {
        "folder": str(folder),
        "files": [
            {
                "path": str(f),
                "bytes": f.stat().st_size,
                "modified": datetime.datetime.fromtimestamp(f.stat().st_mtime, datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
            }
            for f in files
        ],
    }


def random_transformer(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The named architecture with random weights (seed 0), built directly on `device` (`"meta"` builds no weights)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**RANDOM_CONFIGS[name])
    return transformer.to(dtype).eval()


def _random_model(name: str, device: str, dtype: torch.dtype) -> BenchModel:
    """A WanPipeline around the random transformer, Wan 2.1's VAE architecture (random) and its flow scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    if name not in RANDOM_CONFIGS:
        raise BenchError(f"unknown random config {name!r} (known: {', '.join(RANDOM_CONFIGS)})")
    transformer = random_transformer(name, device, dtype)
    with torch.device(device):
        vae = AutoencoderKLWan().eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    text_shape = (WAN_TEXT_TOKENS, RANDOM_CONFIGS[name]["text_dim"])
    return BenchModel(
        pipe,
        f"{name} architecture with random weights",
        {"random_config": name, "seed": 0},
        fidelity_meaningful=False,
        text_shape=text_shape,
    )


class VideoRunner:
    """One generation of a prompt with a seeded generator, as a float32 video [frames, height, width, rgb] in [0, 1]."""

    def __init__(self, model: BenchModel, steps: int, guidance: float, size: dict[str, int]) -> None:
        self.model, self.steps, self.guidance, self.size = model, steps, guidance, dict(size)

    def __call__(self, spec: PromptSpec) -> np.ndarray:
        try:
            with torch.no_grad():
                frames = generate(
                    self.model.pipe, spec, self.steps, self.guidance, self.size, text_inputs=self._text_inputs(spec)
                )
        except ValueError as exc:  # diffusers pipelines refuse bad inputs (sizes, unknown words) with ValueError
            raise BenchError(
                f"the pipeline refused prompt {spec.prompt!r}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            ) from None
        return first_video(frames)

    def _text_inputs(self, spec: PromptSpec) -> dict[str, Any] | None:
        """None (the prompt's text) for real models; seeded random embeddings (cond, uncond) for random configs."""
        if self.model.text_shape is None:
            return None
        transformer = self.model.transformer
        parameter = next(transformer.parameters())
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        cond, uncond = (torch.randn((1, *self.model.text_shape), generator=generator) for _ in range(2))
        return {
            "prompt_embeds": cond.to(parameter.device, parameter.dtype),
            "negative_prompt_embeds": uncond.to(parameter.device, parameter.dtype),
        }
