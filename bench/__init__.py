"""dit-bench: our plans side by side with diffusers' own caches, on the same prompts, seeds and process.

Modules: `models` (which pipeline, one seeded generation), `peers` (diffusers' caches as plain-data settings),
`variants` (baseline, plans, peers as report rows), `measure` (block calls, cache memory, timing, bound), `runner`
(the interleaved measurement), `report` (markdown, JSON, Pareto plot), `cli` (the `dit-bench` command).

Example:
    >>> from dit_accel.bench import BenchOptions, run_bench, summarise, build_report, render_markdown
    >>> report = build_report(summarise(run_bench(BenchOptions(peers=("fbc",), steps=8, repeats=1))))
    >>> print(render_markdown(report))
"""

from .errors import BenchError
from .report import build_report, pareto_figure, pareto_png, render_markdown, to_json, write_outputs
from .runner import BenchOptions, BenchRun, run_bench, summarise

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
