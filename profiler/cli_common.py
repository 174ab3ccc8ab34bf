"""What every command line of the project shares: one-line errors, a non-zero exit code, no traceback."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from runtime.errors import DitAccelError

EXIT_USER_ERROR = 2


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


def _fail(message: str) -> None:
    click.echo(f"error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(EXIT_USER_ERROR)


def emit_report(report: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    """Print a command's report: one JSON object with `--json`, else the human-readable rendering."""
    click.echo(json.dumps(report, indent=2, sort_keys=True, default=float) if as_json else render(report))
