"""Loading a pipeline (the embedded default model or a local diffusers folder) and one seeded generation.

Every stage that runs a model loads it and generates through these two functions, so a seed means the same
noise everywhere: the generator is a CPU `torch.Generator` seeded with the prompt's seed.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_accel.runtime.adapters import find_transformer, get_adapter

from .errors import DitAccelError
from .prompts import PromptSpec

#: The dtypes a pipeline can be loaded in, by the name the command-line options use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(model: str | None, device: str = "cpu", dtype: str = "float32") -> Any:
    """The embedded default pipeline (`model=None`) or a diffusers pipeline from a local folder, never a hub.

    A saved `TinyVideoPipeline` folder (the default model's class) loads through its own `from_pretrained`, since
    diffusers' generic loader needs `accelerate` for Wan's float32-pinned modules. Loading shows no progress bars
    (`_quiet_loading`), as generation shows none of the pipeline's own.
    """
    try:
        with _quiet_loading():
            pipe = _load(model, torch_dtype(dtype))
    except FileNotFoundError as exc:
        raise DitAccelError(str(exc)) from None
    except (OSError, ValueError, KeyError, ImportError) as exc:
        reason = str(exc).splitlines()[0]
        if ("accelerate" in reason or "low_cpu_mem_usage" in reason) and importlib.util.find_spec("accelerate") is None:
            reason = (
                "diffusers needs the package 'accelerate' to load it, which is not installed (pip install accelerate)"
            )
        raise DitAccelError(f"cannot load the pipeline in {model}: {reason}") from None
    pipe = pipe.to(device)
    get_adapter(find_transformer(pipe))
    _check_prompt_cleaning(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_prompt_cleaning(pipe: Any) -> None:
    """Refuse a pipeline whose prompt cleaning needs a package that is missing (SkyReels-V2 calls `ftfy`
    unconditionally), before it fails mid-run with a NameError."""
    clean = getattr(sys.modules.get(type(pipe).__module__), "basic_clean", None)
    if clean is None:
        return
    try:
        clean("a")
    except NameError as exc:
        raise DitAccelError(
            f"{type(pipe).__name__} cleans prompts with the package '{exc.name}', which is not installed "
            f"(pip install {exc.name})"
        ) from None


def _load(model: str | None, dtype: torch.dtype) -> Any:
    if model is None:
        from dit_accel.defaultmodel import load_default_pipeline

        return load_default_pipeline(dtype=dtype)
    index = Path(model) / "model_index.json"
    if not index.is_file():
        raise DitAccelError(
            f"model folder {model} is not a local diffusers pipeline folder (no model_index.json); pass a folder "
            "saved with save_pretrained"
        )
    if json.loads(index.read_text()).get("_class_name") == "TinyVideoPipeline":
        from dit_accel.defaultmodel import TinyVideoPipeline

        return TinyVideoPipeline.from_pretrained(model, torch_dtype=dtype)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=True)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Disable diffusers' and transformers' progress bars and info logging while a pipeline loads, then restore
    their previous settings.

    Their "Loading pipeline components" and "Loading weights" bars go to stderr, so a one-line error raised after
    loading (a prompt the pipeline refuses) would not be one line; the CLIs' own phase lines say what is loading.
    Warnings still show: they report problems with the folder, such as weights a component did not use.
    """
    from diffusers.utils import logging as diffusers_logging

    libraries = [diffusers_logging]
    if importlib.util.find_spec("transformers") is not None:  # only pipelines with a transformers text encoder
        from transformers.utils import logging as transformers_logging

        libraries.append(transformers_logging)
    saved = [(library.is_progress_bar_enabled(), library.get_verbosity()) for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
        library.set_verbosity(max(library.get_verbosity(), library.WARNING))
    try:
        yield
    finally:
        for library, (bars, verbosity) in zip(libraries, saved):
            if bars:
                library.enable_progress_bar()
            library.set_verbosity(verbosity)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (a key of `DTYPES`); anything else is a one-line error."""
    if name not in DTYPES:
        raise DitAccelError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def generate(
    pipe: Any,
    spec: PromptSpec,
    steps: int,
    guidance: float,
    size: dict[str, int],
    output_type: str = "np",
    text_inputs: dict[str, Any] | None = None,
) -> Any:
    """One generation of `spec` with a CPU generator seeded by `spec.seed`; returns the pipeline's frames (an image
    pipeline's images as one-frame videos).

    Args:
        pipe: a diffusers-style text-to-video pipeline.
        spec: prompt, negative prompt (passed only when not empty) and seed.
        steps: number of inference steps.
        guidance: classifier-free guidance scale.
        size: video size keywords (`num_frames`, `height`, `width`), empty for the pipeline's defaults.
        output_type: the pipeline's `output_type` ("np" for pixels, "latent" to skip decoding).
        text_inputs: keywords that replace the prompt text (e.g. `prompt_embeds` for a pipeline with no text encoder).

    Raises:
        DitAccelError: the pipeline needs an input the spec lacks, or the spec's image cannot be read.
    """
    check_pipeline_inputs(pipe, [spec], text_inputs)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    if text_inputs is None:
        text_inputs = {"prompt": spec.prompt}
        if spec.negative_prompt:
            text_inputs["negative_prompt"] = spec.negative_prompt
    conditioning = dict(spec.extra)
    if spec.image is not None:
        conditioning["image"] = load_image(spec.image)
    with _guidance(pipe, guidance) as guidance_inputs:
        result = pipe(
            **text_inputs,
            **conditioning,
            **guidance_inputs,
            num_inference_steps=steps,
            generator=generator,
            output_type=output_type,
            **size,
        )
    if hasattr(result, "frames"):
        return result.frames
    return result.images[:, None] if output_type == "np" else result.images  # an image DiT: one-frame videos


@contextmanager
def _guidance(pipe: Any, guidance: float) -> Iterator[dict[str, float]]:
    """The keywords that set the guidance scale: `guidance_scale`, or none for a pipeline whose `guider` holds the
    scale (HunyuanVideo 1.5 takes no `guidance_scale`), whose guider is then set to `guidance` for the call."""
    if "guidance_scale" in inspect.signature(type(pipe).__call__).parameters or not hasattr(pipe, "guider"):
        yield {"guidance_scale": guidance}
        return
    original = pipe.guider
    pipe.guider = original.new(guidance_scale=guidance)
    try:
        yield {}
    finally:
        pipe.guider = original


def load_image(path: str) -> Any:
    """The RGB image at `path` (a PIL image, as diffusers' image-to-video pipelines take it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DitAccelError(f"cannot read image {path}: {exc}") from None


def check_pipeline_inputs(pipe: Any, specs: list[PromptSpec], text_inputs: dict[str, Any] | None = None) -> None:
    """Refuse, before any generation, prompts that lack an input the pipeline's `__call__` requires (a parameter
    without default, such as an image-to-video pipeline's `image`) or that pass `extra` keywords it does not take.

    `text_inputs` are keywords that replace the prompt text (see `generate`), counted as given.
    """
    parameters = inspect.signature(type(pipe).__call__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    required = [
        name
        for name, p in list(parameters.items())[1:]
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    for number, spec in enumerate(specs, 1):
        given = {"prompt", *(text_inputs or {}), *spec.extra, *(["image"] if spec.image is not None else [])}
        missing = [name for name in required if name not in given]
        if missing:
            hint = ' (add "image": "path" to its line of a .jsonl prompts file)' if missing[0] == "image" else ""
            raise DitAccelError(f"{type(pipe).__name__} needs '{missing[0]}' and prompt {number} has none{hint}")
        unknown = sorted(k for k in (*spec.extra, *(["image"] if spec.image else [])) if k not in parameters)
        if unknown and not takes_any:
            raise DitAccelError(f"{type(pipe).__name__} takes no keyword '{unknown[0]}' (prompt {number})")


def first_video(frames: Any) -> np.ndarray:
    """The first video of a pipeline's frames (tensor, array or nested lists) as float32
    [frames, height, width, rgb]."""
    frames = frames.float().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    return np.asarray(frames[0], dtype=np.float32)
