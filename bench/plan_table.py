"""Measured speedup and fidelity of every method preset at several budgets on the default model.

Fits `auto` and each preset (`profilingdit`, `adacache`, `bwcache`, `unicp`) at each target speedup from one
profile, plus three runtime variants at the middle budget (caching only, pruning only, caching + pruning with DWS),
and measures for each: transformer FLOP speedup (torch's counter, CPU attention included), wall-clock speedup
(median of full and planned runs interleaved in one process), and PSNR (global MSE) / SSIM against the
un-accelerated video of the same seed. Prints a markdown table; `--json` writes every number too.

    python -m dit_accel.bench.plan_table [--targets 1.5 2 3] [--steps 50] [--prompts 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from dit_accel.harness.captions import CALIBRATION, HELD_OUT
from dit_accel.harness.metrics import psnr, ssim
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner import FitOptions, PlannerError, fit_plan
from dit_accel.planner.methods import METHODS
from dit_accel.planner.validate import PipelineRunner
from dit_accel.profiler.flops import count_flops
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts
from dit_accel.runtime import COMPUTE, PRUNE, REUSE, Plan, apply_plan


def prune_only(plan: Plan) -> Plan:
    """The pruning part of a caching+pruning plan alone: every reused or pruned cell becomes a prune step, no DWS."""
    actions = np.where(plan.actions == COMPUTE, COMPUTE, PRUNE).astype(np.uint8)
    arrays = {k: v for k, v in plan.arrays.items() if k != "dws_weight"}
    return plan.with_changes(actions=actions, spans=(), arrays=arrays, predicted={})


def caching_only(plan: Plan) -> Plan:
    """The caching part alone: prune steps computed in full."""
    actions = np.where(plan.actions == PRUNE, COMPUTE, plan.actions).astype(np.uint8)
    return plan.with_changes(actions=actions, arrays={k: v for k, v in plan.arrays.items() if k != "dws_weight"})


def flops(pipe, runner: PipelineRunner, plan: Plan | None, prompt: PromptSpec, steps: int) -> int:
    def run() -> None:
        runner.generate(prompt, steps)

    if plan is None:
        return count_flops(run)[1].get(type(pipe.transformer).__name__, 0)
    with apply_plan(pipe, plan):
        return count_flops(run)[1].get(type(pipe.transformer).__name__, 0)


def measure(
    pipe, runner: PipelineRunner, plan: Plan, prompts: list[PromptSpec], steps: int, repeats: int, full: dict
) -> dict:
    """Wall times interleaved with full runs, fidelity per prompt, FLOP speedup on the first prompt."""
    plan_times, scores = [], []
    for index, prompt in enumerate(prompts):
        for _ in range(repeats):
            start = time.perf_counter()
            runner.generate(prompt, steps)
            full["times"].append(time.perf_counter() - start)
            with apply_plan(pipe, plan):
                start = time.perf_counter()
                video = runner.generate(prompt, steps)
                plan_times.append(time.perf_counter() - start)
        scores.append((psnr(video, full["videos"][index]), ssim(video, full["videos"][index])))
    return {
        "flop_speedup": full["flops"] / flops(pipe, runner, plan, prompts[0], steps),
        "wall_speedup": statistics.median(full["times"]) / statistics.median(plan_times),
        "psnr": [s[0] for s in scores],
        "ssim": [s[1] for s in scores],
        "predicted_speedup": plan.predicted.get("speedup"),
        "reuse_fraction": float(np.mean(plan.actions == REUSE)),
        "prune_fraction": float(np.mean(plan.actions == PRUNE)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="artifacts/plan_table")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(None)
    runner = PipelineRunner(pipe)
    profile = out / f"profile_{args.steps}.h5"
    specs = [PromptSpec(text, "", 1000 + i) for i, text in enumerate(CALIBRATION)]
    profile_prompts(pipe, specs, profile, RecordSettings(num_inference_steps=args.steps), resume=profile.exists())
    prompts = [PromptSpec(text, "", i) for i, text in enumerate(HELD_OUT[: args.prompts])]
    full = {"videos": [runner.generate(p, args.steps) for p in prompts], "times": []}
    full["flops"] = flops(pipe, runner, None, prompts[0], args.steps)
    rows = []
    middle = args.targets[len(args.targets) // 2]
    for target in args.targets:
        for method in METHODS:
            options = FitOptions(method=method, target_speedup=target, prune=method == "unicp")
            try:
                plan = fit_plan([str(profile)], options)
            except PlannerError as exc:
                rows.append({"method": method, "target": target, "error": str(exc)})
                continue
            rows.append(
                {
                    "method": method,
                    "target": target,
                    **measure(pipe, runner, plan, prompts, args.steps, args.repeats, full),
                }
            )
        if target == middle:
            both = fit_plan(
                [str(profile)],
                FitOptions(method="auto", target_speedup=target, prune=True, granularity="block", pca_variance=0.8),
            )
            for label, plan in (
                ("caching only", caching_only(both)),
                ("pruning only", prune_only(both)),
                ("caching + pruning + DWS", both),
            ):
                rows.append(
                    {
                        "method": label,
                        "target": target,
                        **measure(pipe, runner, plan, prompts, args.steps, args.repeats, full),
                    }
                )
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(
        f"default model, {args.steps} steps, {len(prompts)} held-out captions, {args.repeats} repeats; PSNR from the "
        "global MSE"
    )
    print("| method | target | FLOP speedup | wall speedup | PSNR min / mean (dB) | SSIM mean | reuse / prune cells |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | {row['target']}x | n/a: {row['error']} | | | | |")
            continue
        print(
            f"| {row['method']} | {row['target']}x | {row['flop_speedup']:.2f}x | {row['wall_speedup']:.2f}x | "
            f"{min(row['psnr']):.1f} / {np.mean(row['psnr']):.1f} | {np.mean(row['ssim']):.3f} | "
            f"{row['reuse_fraction']:.0%} / {row['prune_fraction']:.0%} |"
        )


if __name__ == "__main__":
    main()
