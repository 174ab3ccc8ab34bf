"""Checks every command runs first, before any long work: prompts the model can read, files it can write.

A mistake found here costs the user one line and no time; found later, it costs a profiling run (a caption the
tokenizer refuses at prompt 40 of 50) or a fit (a figure format matplotlib does not know). So the commands call these
right after loading what they need and before the first generation, fit or export.

Example:
    >>> check_output_file("plans/new.plan")          # the folder exists and is writable
    >>> check_prompts(pipe, read_prompt_file("captions.txt"), "captions.txt")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DitAccelError
from .prompts import PromptSpec


def check_output_file(path: str | os.PathLike, option: str = "-o") -> Path:
    """`path` as a file a command may write: its folder exists and is writable, and it is not itself a folder.

    Nothing is created: a missing folder is a typo more often than a wish, so it is refused (one line naming it)
    rather than made.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise DitAccelError(f"{option} {path} is a folder; name a file")
    if not folder.is_dir():
        raise DitAccelError(f"{option} {path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise DitAccelError(f"{option} {path}: output folder {folder} is not writable")
    return path


def image_extensions() -> tuple[str, ...]:
    """The file extensions matplotlib can write a figure to (png, svg, pdf, …), sorted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return tuple(sorted(FigureCanvasAgg.get_supported_filetypes()))


def check_image_file(path: str | os.PathLike, option: str = "--plot") -> Path:
    """`path` as an image file to write: an extension matplotlib knows, in a writable folder that exists."""
    path = check_output_file(path, option)
    extension = path.suffix.lower().lstrip(".")
    supported = image_extensions()
    if extension not in supported:
        named = f"extension .{extension}" if extension else "no extension"
        raise DitAccelError(f"{option} {path} has {named}; supported image extensions: {', '.join(supported)}")
    return path


def check_prompts(pipe: Any, specs: Sequence[PromptSpec], source: str = "prompts") -> None:
    """Refuse, in one line, the first prompt (or negative prompt) of `specs` that `pipe`'s tokenizers refuse.

    Tokenizers with a closed vocabulary (the default model's) raise `ValueError` on an unknown word, deep inside a
    generation and with a multi-line message; this runs every text through every tokenizer the pipeline has
    (`tokenizer`, `tokenizer_2`, …) up front, so a bad caption at line 40 is reported before line 1 is profiled.
    Tokenizers that accept any text (Hugging Face ones) pass everything.
    """
    components = getattr(pipe, "components", None) or vars(pipe)
    check_texts([components[name] for name in sorted(components) if name.startswith("tokenizer")], specs, source)


def check_texts(tokenizers: Sequence[Any], specs: Sequence[PromptSpec], source: str = "prompts") -> None:
    """`check_prompts` with the tokenizers given (callables that raise `ValueError` on a text they refuse)."""
    for number, spec in enumerate(specs, 1):
        for kind, text in (("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)):
            if text:
                _check_text(tokenizers, text, f"{kind} {number} of {source}")


def _check_text(tokenizers: Sequence[Any], text: str, where: str) -> None:
    for tokenizer in tokenizers:
        if not callable(tokenizer):
            continue
        try:
            tokenizer(text)
        except ValueError as exc:
            first, *details = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
            reason = " ".join([first, "; ".join(details)]) if details else first
            raise DitAccelError(f"the tokenizer refused {where} ({text!r}): {reason}") from None
