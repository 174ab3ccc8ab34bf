"""Prompt files: `.txt` (one prompt per line, seeds 0, 1, …) or `.jsonl` (one JSON object per line).

A `.jsonl` line holds `prompt` and optionally `negative_prompt`, `seed`, `image` (a path, relative to the prompts
file, for image-to-video pipelines) and `extra` (an object of further pipeline keywords, such as
`{"true_cfg_scale": 4.0}`); docs/adapters.md lists them. One reader for every command that takes prompts
(`dit-profile`, `dit-plan validate`, `dit-bench`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DitAccelError

#: Keywords `harness.pipelines.generate` sets itself, which a prompt's `extra` may not override.
RESERVED_KEYWORDS = frozenset(
    {"prompt", "negative_prompt", "image", "num_inference_steps", "guidance_scale", "generator", "output_type"}
)
#: Keys a `.jsonl` prompt line may hold.
JSON_KEYS = ("prompt", "negative_prompt", "seed", "image", "extra")


@dataclass(frozen=True)
class PromptSpec:
    """One calibration prompt: text, negative text, the seed of its initial noise, and conditioning inputs.

    `image` is the path of a conditioning image (image-to-video), loaded when the prompt is generated; `extra` holds
    further keyword arguments for the pipeline call.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    image: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


def read_prompt_file(path: str | os.PathLike) -> list[PromptSpec]:
    """Prompts from a `.txt` file (one per line, seeds 0, 1, …) or `.jsonl` (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DitAccelError(f"prompts file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise DitAccelError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    entries = [
        (n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")
    ]
    if not entries:
        raise DitAccelError(f"prompts file {path} holds no prompt (one per line, or JSON lines with a 'prompt' key)")
    if path.suffix == ".jsonl":
        return [_prompt_from_json(path, n, line) for n, line in entries]
    return [PromptSpec(line, "", seed) for seed, (_, line) in enumerate(entries)]


def _prompt_from_json(path: Path, line_number: int, line: str) -> PromptSpec:
    try:
        data = json.loads(line)
    except ValueError:
        raise DitAccelError(f"{path}:{line_number}: not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise DitAccelError(f"{path}:{line_number}: each JSON line needs a non-empty string 'prompt'")
    unknown = sorted(set(data) - set(JSON_KEYS))
    if unknown:
        raise DitAccelError(
            f"{path}:{line_number}: unknown key {unknown[0]!r} (known: {', '.join(JSON_KEYS)}; pipeline keywords go "
            "in 'extra')"
        )
    seed = data.get("seed", line_number - 1)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DitAccelError(f"{path}:{line_number}: 'seed' must be an integer")
    negative = data.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise DitAccelError(f"{path}:{line_number}: 'negative_prompt' must be a string")
    return PromptSpec(
        data["prompt"], negative, seed, _image_path(path, line_number, data), _extra(path, line_number, data)
    )


def _image_path(path: Path, line_number: int, data: dict[str, Any]) -> str | None:
    """The line's `image` as a path (relative ones are relative to the prompts file); it must exist now."""
    image = data.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image.strip():
        raise DitAccelError(f"{path}:{line_number}: 'image' must be the path of an image file")
    resolved = path.parent / Path(image).expanduser()
    if not resolved.is_file():
        raise DitAccelError(f"{path}:{line_number}: image {resolved} does not exist")
    return str(resolved)


def _extra(path: Path, line_number: int, data: dict[str, Any]) -> dict[str, Any]:
    """The line's `extra` pipeline keywords: an object whose keys are not set by the generation itself."""
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise DitAccelError(f"{path}:{line_number}: 'extra' must be an object of pipeline keywords")
    reserved = sorted(set(extra) & RESERVED_KEYWORDS)
    if reserved:
        raise DitAccelError(f"{path}:{line_number}: 'extra' may not set {reserved[0]!r} (it has its own key or option)")
    return extra
