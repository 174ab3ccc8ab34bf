"""Prompt files: `.txt` (one prompt per line, seeds 0, 1, …) or `.jsonl` (prompt, negative_prompt, seed).

One reader for every command that takes prompts (`dit-profile`, `dit-plan validate`, `dit-bench`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DitAccelError


@dataclass(frozen=True)
class PromptSpec:
    """One calibration prompt: text, negative text and the seed of its initial noise."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0


def read_prompt_file(path: str | os.PathLike) -> list[PromptSpec]:
    """Prompts from a `.txt` file (one per line, seeds 0, 1, …) or `.jsonl` (prompt, negative_prompt, seed)."""
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
    seed = data.get("seed", line_number - 1)
    if not isinstance(seed, int):
        raise DitAccelError(f"{path}:{line_number}: 'seed' must be an integer")
    return PromptSpec(data["prompt"], str(data.get("negative_prompt", "")), seed)
