"""dit-bench: our plans side by side with diffusers' own caches, on the same prompts, seeds and process.

Modules: `models` (which pipeline, one seeded generation), `peers` (diffusers' caches as plain-data settings),
`variants` (baseline, plans, peers as report rows), `measure` (block calls, cache memory, timing, bound), `runner`
(the interleaved measurement), `report` (markdown, JSON, Pareto plot), `cli` (the `dit-bench` command).

Example:
    >>> from dit_accel.bench import BenchOptions, run_bench, summarise, build_report, render_markdown
    >>> report = build_report(summarise(run_bench(BenchOptions(peers=("fbc",), steps=8, repeats=1))))
    >>> print(render_markdown(report))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import BenchError
    from .report import build_report, pareto_figure, pareto_png, render_markdown, to_json, write_outputs
    from .runner import BenchOptions, BenchRun, run_bench, summarise

#: Public name → the module that defines it. Imported on first use (PEP 562), so that `dit-bench --help` and
#: `dit-demo --help`, which import this package, do not import torch through the runner.
_SOURCES = {
    "BenchError": "errors",
    "build_report": "report",
    "pareto_figure": "report",
    "pareto_png": "report",
    "render_markdown": "report",
    "to_json": "report",
    "write_outputs": "report",
    "BenchOptions": "runner",
    "BenchRun": "runner",
    "run_bench": "runner",
    "summarise": "runner",
}

__all__ = [
    "BenchError",
    "BenchOptions",
    "BenchRun",
    "build_report",
    "pareto_figure",
    "pareto_png",
    "render_markdown",
    "run_bench",
    "summarise",
    "to_json",
    "write_outputs",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
