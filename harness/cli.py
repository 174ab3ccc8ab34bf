"""What every command line of the project shares: one-line errors, a non-zero exit code, no traceback, `-h` as well
as `--help`, and the options that every command loading a pipeline spells the same way (defined once here, applied as
decorators).

This module imports click and nothing heavy (no torch): `--help` of every command stays instant as long as the
commands import the library inside their bodies.

Example:
    >>> @click.command(cls=OneLineErrorCommand, context_settings=CONTEXT_SETTINGS)
    ... @MODEL
    ... @DEVICE
    ... @DTYPE
    ... @steps_option(default=50)
    ... @user_errors
    ... def run(model, device, dtype, steps): ...
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import DitAccelError

EXIT_USER_ERROR = 2
#: `-h` and `--help` on every command and group.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
#: The dtype names `--dtype` accepts: the keys of `harness.pipelines.DTYPES`, spelled here so that `--help` does not
#: import torch (tests/test_cli_conventions.py checks that the two agree).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for click commands: the project's errors (and OSError on user paths) become one stderr line."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DitAccelError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))

    return wrapper


class OneLineUsageErrors:
    """Mixin for click commands and groups: usage errors (bad option values, missing arguments) are one line too."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            _fail(exc.format_message())
        except click.Abort:
            _fail("aborted")


class OneLineErrorCommand(OneLineUsageErrors, click.Command):
    """A click command whose every error is one `error: …` line and exit code 2."""


class OneLineErrorGroup(OneLineUsageErrors, click.Group):
    """A click group whose every error is one `error: …` line and exit code 2."""


def printable(text: str) -> str:
    """`text` made safe to print: every control or format character shown as its Python escape.

    Escape sequences, newlines, carriage returns and bidirectional overrides in text read from a file (a plan's
    metadata, a path it names) would otherwise drive the terminal; each becomes an escape such as `\\x1b`.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fail(message: str) -> None:
    click.echo(f"error: {printable(message.splitlines()[0]) if message else 'failed'}", err=True)
    sys.exit(EXIT_USER_ERROR)


def emit_report(report: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    """Print a command's report: one JSON object with `--json`, else the human-readable rendering."""
    click.echo(json.dumps(report, indent=2, sort_keys=True, default=float) if as_json else render(report))


#: `--model FOLDER`: a local diffusers pipeline folder; the embedded default model when omitted.
MODEL = click.option(
    "--model",
    default=None,
    type=click.Path(file_okay=False),
    help="Local diffusers pipeline folder (default: the embedded default model).",
)
#: `--device`: where the pipeline runs.
DEVICE = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
#: `--dtype`: the dtype the pipeline is loaded in.
DTYPE = click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(DTYPE_NAMES),
    help="dtype the pipeline is loaded in.",
)
#: `--frames/--height/--width`: video size; each defaults to the pipeline's (or the profile's, where one is given).
FRAMES = click.option("--frames", default=None, type=click.IntRange(1), help="Video frames (default: the pipeline's).")
HEIGHT = click.option(
    "--height", default=None, type=click.IntRange(8), help="Video height in pixels (default: the pipeline's)."
)
WIDTH = click.option(
    "--width", default=None, type=click.IntRange(8), help="Video width in pixels (default: the pipeline's)."
)
#: `--json`: the report as one JSON object on stdout.
JSON = click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
#: `--quiet`: no progress bars and no phase lines.
QUIET = click.option("--quiet", is_flag=True, help="No progress bars or phase lines; only the final report.")


def steps_option(default: int | None = None, source: str = "", minimum: int = 2) -> Callable[[Callable[..., Any]], Any]:
    """`--steps N` (denoising steps, at least `minimum`): a fixed default, or `source` naming where it comes from."""
    where = f"default: {source}" if source else f"default: {default}"
    return click.option("--steps", default=default, type=click.IntRange(minimum), help=f"Denoising steps ({where}).")


def guidance_option(
    default: float | None = None, source: str = "", note: str = ""
) -> Callable[[Callable[..., Any]], Any]:
    """`--guidance G` (classifier-free guidance scale): a fixed default, or `source` naming where it comes from."""
    where = f"default: {source}" if source else f"default: {default:g}"
    return click.option(
        "--guidance", default=default, type=float, help=f"Classifier-free guidance scale ({where}){note}."
    )


def prompts_option(required: bool = True, what: str = "Prompts") -> Callable[[Callable[..., Any]], Any]:
    """`--prompts FILE`: a prompts file (.txt one per line, seeds 0, 1, …; .jsonl prompt, negative_prompt, seed)."""
    return click.option(
        "--prompts",
        "prompts_path",
        required=required,
        type=click.Path(dir_okay=False),
        help=f"{what}: .txt one per line (seeds 0, 1, …) or .jsonl (prompt, negative_prompt, seed).",
    )


def say(message: str, quiet: bool) -> None:
    """One phase line on stderr (what a long phase is doing), unless `--quiet`; stdout keeps only the report."""
    if not quiet:
        click.echo(printable(message), err=True)


def video_size(frames: int | None, height: int | None, width: int | None) -> dict[str, int]:
    """The pipeline keywords for the sizes given on the command line (`num_frames`, `height`, `width`)."""
    return {k: v for k, v in {"num_frames": frames, "height": height, "width": width}.items() if v is not None}
