"""`python -m dit_accel.bench.indicator_cost`: what BWCache's indicator costs per step on the default model.

Fits `bwcache` on a calibration profile, then sets its threshold below every possible indicator value, so that every
step computes and also measures the indicator (the cost a step pays whether or not it then reuses). Times, interleaved
in one process, one held-out caption generated four ways: without a plan; with an all-compute static plan (the replay
hooks alone); with that bwcache plan (the indicator on the paper's subset of blocks); and with the same plan measuring
every block (the paper's indicator for models without full 3-D attention). Prints, per way, the median over
`--repeats` rounds of its time over the plain generation's in the same round, and the range; as every step does the
same work, the ratio is also the per-step cost.

    python -m dit_accel.bench.indicator_cost [--steps 20] [--repeats 5] [--profile cal.h5] [--out cost.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from dit_accel.harness.captions import EVALUATION
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner import FitOptions
from dit_accel.planner.methods import fit_profiles
from dit_accel.runtime import Plan, apply_plan

from .heldout import calibration_profiles, held_out_video, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="An existing calibration profile (default: profile now).")
    parser.add_argument("--out", type=Path, help="Write every timing ratio as JSON here.")
    return parser.parse_args(argv)


def variants(plan: Plan) -> dict[str, Plan | None]:
    """The four ways to generate: plain, hooks only, bwcache's indicator on its subset, and on every block."""
    never = {**plan.policy, "threshold": -1.0}
    every_block = {**never, "indicator_blocks": list(range(plan.num_blocks))}
    return {
        "plain": None,
        "hooks only": plan.with_changes(policy={"kind": "static"}, arrays={}),
        f"indicator on blocks {plan.policy['indicator_blocks']}": plan.with_changes(policy=never),
        "indicator on every block": plan.with_changes(policy=every_block),
    }


def interleaved_ratios(jobs: dict[str, Callable[[], Any]], repeats: int, baseline: str) -> dict[str, list[float]]:
    """Wall time of each job over that of `baseline` in the same round, the jobs run in turn `repeats` times after one
    untimed round (each round's ratio shares its moment of machine load)."""
    ratios: dict[str, list[float]] = {name: [] for name in jobs}
    for round_index in range(repeats + 1):
        seconds = {}
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            seconds[name] = time.perf_counter() - start
        if round_index > 0:
            for name, value in seconds.items():
                ratios[name].append(value / seconds[baseline])
    return ratios


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fit bwcache, time the four ways, and return the ratios to the plain generation."""
    pipe = load_pipeline(None)
    with calibration_profiles(pipe, args) as profiles:
        plan = fit_profiles(profiles, FitOptions(method="bwcache"))
    text, seed = EVALUATION[0]
    spec = PromptSpec(text, "", seed)

    def job(variant: Plan | None) -> Callable[[], np.ndarray]:
        def generate() -> np.ndarray:
            with nullcontext() if variant is None else apply_plan(pipe, variant):
                return held_out_video(pipe, spec, args)

        return generate

    ratios = interleaved_ratios({name: job(v) for name, v in variants(plan).items()}, args.repeats, "plain")
    return {
        "steps": args.steps,
        "repeats": args.repeats,
        "ratio_to_plain": {name: statistics.median(values) for name, values in ratios.items()},
        "ratios_per_round": ratios,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m dit_accel.bench.indicator_cost`."""
    args = parse_args(argv)
    report = run(args)
    print("| generation | median ratio to plain | range over rounds |")
    print("|---|---|---|")
    for name, ratio in report["ratio_to_plain"].items():
        rounds = report["ratios_per_round"][name]
        print(f"| {name} | {ratio:.3f}x | {min(rounds):.3f}–{max(rounds):.3f}x |")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
