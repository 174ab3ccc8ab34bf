"""`python -m dit_accel.bench.presets`: the four paper presets measured on twelve held-out captions.

Profiles the six calibration captions (`plans/calibration.jsonl`'s, seeds 1000–1005) at `--steps` (or reads
`--profile`), fits profilingdit, adacache, bwcache and unicp at their paper defaults and at each `--targets` speedup,
and generates the twelve held-out captions of `harness.captions.EVALUATION` without a plan and with each. Reported
per plan: the speedup predicted at fitting time, the speedup reached (block calls: all block calls / computed ones,
counted on each block's first linear layer outside its self-attention, so adaptive plans count what their decisions
really computed; FLOPs: the same calls weighted by the profiled block FLOPs, less the self-attention FLOPs of every
computed block call whose self-attention did not run (attention-level UniCP), a pruned call counted in full), the PSNR
of the MSE pooled over the twelve videos and the worst caption's PSNR. No plan sees a held-out caption.
`--cache-levels` fits UniCP at each cache level given (default: its default level).

    python -m dit_accel.bench.presets --steps 20 [--targets 2] [--methods ...] [--profile cal.h5]
        [--cache-levels attention block] [--out artifacts/presets.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_accel.harness.captions import EVALUATION
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner import FitOptions, PlannerError
from dit_accel.planner.methods import fit_profiles
from dit_accel.planner.profiles import ProfileSet
from dit_accel.runtime import apply_plan, get_adapter
from dit_accel.runtime.plan import CACHE_LEVELS

from .heldout import calibration_profiles, held_out_video, pooled_psnr, write_report

PRESETS = ("profilingdit", "adacache", "bwcache", "unicp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--targets", type=float, nargs="*", default=[2.0], help="Speedups fitted besides the default.")
    parser.add_argument("--methods", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--captions", type=int, default=len(EVALUATION), help="Held-out captions (smoke: fewer).")
    parser.add_argument("--profile", type=Path, help="An existing calibration profile (default: profile now).")
    parser.add_argument("--cache-levels", nargs="+", choices=CACHE_LEVELS, help="UniCP's cache levels.")
    parser.add_argument("--out", type=Path, help="Write every number as JSON here.")
    return parser.parse_args(argv)


@contextmanager
def counted_block_calls(transformer: torch.nn.Module) -> Iterator[np.ndarray]:
    """Counts [blocks] of computed calls, read on the first linear layer of each block outside its self-attention
    (a reused block skips it; an attention-level reuse skips only the self-attention)."""
    with counted_calls(transformer) as (blocks, _):
        yield blocks


@contextmanager
def counted_calls(transformer: torch.nn.Module) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Counts [blocks] of computed block calls and of computed self-attention calls (the first linear layer inside the
    adapter's self-attention module)."""
    attention_attr = get_adapter(transformer).self_attention.attr
    blocks = list(transformer.blocks)
    counts = np.zeros((2, len(blocks)), dtype=np.int64)
    handles = []
    for index, block in enumerate(blocks):
        attention = getattr(block, attention_attr)
        inside = {id(m) for m in attention.modules()}
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        outside = next(m for m in linears if id(m) not in inside)
        within = next(m for m in attention.modules() if isinstance(m, torch.nn.Linear))
        for row, linear in enumerate((outside, within)):
            handles.append(linear.register_forward_hook(_counter(counts, row, index)))
    try:
        yield counts[0], counts[1]
    finally:
        for handle in handles:
            handle.remove()


def _counter(counts: np.ndarray, row: int, block: int) -> Any:
    """A forward hook adding one to counts[row, block]."""

    def bump(*_: Any) -> None:
        counts[row, block] += 1

    return bump


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Profile (unless given), fit every preset at its default and each target, and measure each plan."""
    pipe = load_pipeline(None)
    with calibration_profiles(pipe, args) as profiles:
        return _measure(pipe, profiles, args)


def _measure(pipe: Any, profiles: ProfileSet, args: argparse.Namespace) -> dict[str, Any]:
    held_out = [PromptSpec(text, "", seed) for text, seed in EVALUATION[: args.captions]]
    with counted_block_calls(pipe.transformer) as counts:
        references = [held_out_video(pipe, spec, args) for spec in held_out]
        full = counts.copy()
    flops = profiles.header.block_flops.astype(np.float64)
    rows = []
    for method, level in _fits(args):
        for target in (None, *args.targets):
            row: dict[str, Any] = {"method": method, "target": target, "cache_level": level}
            try:
                plan = fit_profiles(profiles, FitOptions(method=method, target_speedup=target, cache_level=level))
            except PlannerError as exc:
                rows.append({**row, "refused": str(exc)})
                print(_row(rows[-1]), flush=True)
                continue
            with counted_calls(pipe.transformer) as (counts, attention), apply_plan(pipe, plan):
                videos = [held_out_video(pipe, spec, args) for spec in held_out]
            pooled, worst = pooled_psnr(videos, references)
            skipped = plan.arrays.get("cost.attention_flops", np.zeros_like(flops)) @ (counts - attention)
            row.update(
                predicted=float(plan.predicted["speedup"]),
                block_calls=float(full.sum() / max(counts.sum(), 1)),
                flops=float(flops @ full / max(float(flops @ counts - skipped), 1.0)),
                pooled_psnr=pooled,
                worst_psnr=worst,
                chosen=plan.provenance["chosen"],
            )
            rows.append(row)
            print(_row(row), flush=True)
    return {"steps": args.steps, "guidance": args.guidance, "held_out": len(held_out), "rows": rows}


def _fits(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(method, cache level) of every preset fitted: UniCP once per `--cache-levels` entry, the others once."""
    levels = args.cache_levels or [None]
    return [(m, level) for m in args.methods for level in (levels if m == "unicp" else [None])]


def _row(row: dict[str, Any]) -> str:
    target = "paper default" if row["target"] is None else f"{row['target']:g}x"
    method = row["method"] if row["cache_level"] is None else f"{row['method']} ({row['cache_level']})"
    if "refused" in row:
        return f"| {method} | {target} | refused: {row['refused']} |"
    return (
        f"| {method} | {target} | {row['predicted']:.2f}x | {row['block_calls']:.2f}x | {row['flops']:.2f}x | "
        f"{row['pooled_psnr']:.1f} | {row['worst_psnr']:.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m dit_accel.bench.presets`."""
    args = parse_args(argv)
    print("| preset | fitted at | predicted | block calls | FLOPs | pooled PSNR (dB) | worst caption (dB) |")
    print("|---|---|---|---|---|---|---|")
    write_report(run(args), args.out)


if __name__ == "__main__":
    main()
