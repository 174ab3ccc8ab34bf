"""`python -m dit_accel.bench.indicator_cost`: what BWCache's indicator costs per step on the default model.

Fits `bwcache` on a calibration profile, then sets its threshold below every possible indicator value, so that every
step computes and also measures the indicator (the cost a step pays whether or not it then reuses). Times, interleaved
in one process, one held-out caption generated four ways: without a plan; with an all-compute static plan (the replay
hooks alone); with that bwcache plan (the indicator on the paper's subset of blocks); and with the same plan measuring
every block (the paper's indicator for models without full 3-D attention). Prints, per way, the median over
`--repeats` rounds of its time over the plain generation's in the same round, and the range; as every step does the
same work, the ratio is also the per-step cost.

Whole generations on a shared machine vary by more than the indicator costs, so it also times the parts directly
(`component_share`): the runtime's own indicator code (`BWCachePolicy.observe` and the step's reduction, as the replay
calls them) on block outputs captured from a real generation, against the block calls of one step (every block, every
CFG branch), each the median of many back-to-back repetitions.

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
import torch

from dit_accel.harness.captions import EVALUATION
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner import FitOptions
from dit_accel.planner.methods import fit_profiles
from dit_accel.runtime import Plan, apply_plan
from dit_accel.runtime.adaptive import BWCachePolicy

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


def _median_seconds(job: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `job` over `repeats` back-to-back calls, after one untimed call."""
    job()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _captured_block_calls(pipe: Any, spec: PromptSpec, args: argparse.Namespace, step: int) -> list[tuple]:
    """(block, args, kwargs, output) of every block call at denoising step `step` of one plain generation."""
    blocks = list(pipe.transformer.blocks)
    calls, counter = [], {"calls": 0}
    per_step = len(blocks) * 2  # cond and uncond: the default model runs CFG as separate calls

    def hook(block: Any, hook_args: tuple, kwargs: dict, output: Any) -> None:
        if counter["calls"] // per_step == step:
            calls.append((block, hook_args, kwargs, output))
        counter["calls"] += 1

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        held_out_video(pipe, spec, args)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def component_share(pipe: Any, plan: Plan, spec: PromptSpec, args: argparse.Namespace, repeats: int = 200) -> dict:
    """Seconds of bwcache's indicator per step (on its subset and on every block) over those of the step's block calls.

    The indicator runs the runtime's code on captured outputs, as the replay calls it at a computed step:
    `begin_step`, `observe` on each indicator block of the decider branch, and `end_step` (the reduction to numbers
    and the decision), with the threshold below any distance so that every step computes and measures."""
    calls = _captured_block_calls(pipe, spec, args, step=args.steps // 2)
    outputs = [c[3] for c in calls[: plan.num_blocks]]  # the decider branch: the step's first pass over the blocks

    def blocks_of_step() -> None:
        with torch.no_grad():
            for block, hook_args, kwargs, _ in calls:
                block(*hook_args, **kwargs)

    def indicator(blocks: list[int]) -> Callable[[], None]:
        never = {**plan.policy, "indicator_blocks": blocks, "threshold": -1.0}  # every step computes and measures
        policy, steps, step = BWCachePolicy(never, plan.num_blocks), 1 << 30, iter(range(1 << 30))

        def measure() -> None:  # one computed step as the replay runs it: decide, observe the blocks, reduce
            now = next(step)
            policy.begin_step("cond", now, steps)
            for b in blocks:
                policy.observe("cond", b, outputs[b], outputs[b], now, 1)
            policy.end_step("cond", now, steps)

        return measure

    step_seconds = _median_seconds(blocks_of_step, max(repeats // 10, 5))
    subset = list(plan.policy["indicator_blocks"])
    return {
        "block_calls_per_step": len(calls),
        f"indicator on blocks {subset}": _median_seconds(indicator(subset), repeats) / step_seconds,
        "indicator on every block": _median_seconds(indicator(list(range(plan.num_blocks))), repeats) / step_seconds,
    }


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
        "share_of_step_blocks": component_share(pipe, plan, spec, args),
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
    share = report["share_of_step_blocks"]
    print(f"\nmeasured alone, per step, against the step's {share['block_calls_per_step']} block calls:")
    for name, value in share.items():
        if name != "block_calls_per_step":
            print(f"- {name}: {value:.2%} of their time")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
