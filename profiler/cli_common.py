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


def _fail(message: str) -> None:
    click.echo(f"error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(EXIT_USER_ERROR)


def emit_report(report: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], str]) -> None:
    """Print a command's report: one JSON object with `--json`, else the human-readable rendering."""
    click.echo(json.dumps(report, indent=2, sort_keys=True, default=float) if as_json else render(report))
