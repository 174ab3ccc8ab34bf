"""`python -m dit_accel.bench.heldout`: `auto` plans measured on twelve held-out captions, versions side by side.

Profiles the six calibration captions (`plans/calibration.jsonl`'s, seeds 1000–1005) at `--steps`, fits `auto` at
every `--targets` speedup in each of `--versions` — `v1`: the greedy solver on the drift error model
(`--reuse extrapolate`); `v2-plain`: the exact search on measured reuse costs with its closed loop on the calibration
prompts, whole-stack reuse only (`--front-blocks 0`); `v2`: the same, with corrector depths the closed loop may
choose — and generates the twelve held-out captions of `harness.captions.EVALUATION` without a plan and with each.
Reported per plan: block-call speedup (all block calls / computed ones), PSNR of the MSE pooled over the twelve
videos, and the worst caption's PSNR. No plan sees a held-out caption.

    python -m dit_accel.bench.heldout --steps 20 --targets 1.5 2 2.5 3 [--versions v1 v2-plain v2]
        [--profile calibration.h5] [--out artifacts/heldout.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dit_accel.harness.captions import CALIBRATION, EVALUATION
from dit_accel.harness.files import write_bytes_atomic
from dit_accel.harness.pipelines import first_video, generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner import FitOptions, PlannerError
from dit_accel.planner.closed_loop import closed_loop_from_profile
from dit_accel.planner.methods import fit_profiles
from dit_accel.planner.profiles import ProfileSet, load_profiles
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts
from dit_accel.runtime import REUSE, Plan, apply_plan

#: Fit options (besides the target) and whether the closed loop runs, per compared version of `auto`.
VERSIONS: dict[str, tuple[dict[str, Any], bool]] = {
    "v1": ({"reuse": "extrapolate"}, False),
    "v2-plain": ({"front_blocks": 0}, True),
    "v2": ({}, True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--versions", nargs="+", choices=sorted(VERSIONS), default=["v1", "v2-plain", "v2"])
    parser.add_argument("--profile", type=Path, help="An existing calibration profile (default: profile now).")
    parser.add_argument("--out", type=Path, help="Write every number as JSON here.")
    return parser.parse_args(argv)


def pooled_psnr(videos: list[np.ndarray], references: list[np.ndarray]) -> tuple[float, float]:
    """(PSNR of the MSE averaged over videos, the worst video's PSNR), videos in [0, 1]."""
    errors = [float(np.mean((v - r) ** 2)) for v, r in zip(videos, references, strict=True)]
    return _psnr(float(np.mean(errors))), _psnr(max(errors))


def _psnr(mse: float) -> float:
    return math.inf if mse <= 0 else -10.0 * math.log10(mse)


def block_call_speedup(plan: Plan) -> float:
    """All block calls / computed block calls of a static plan."""
    return plan.actions.size / max(int((plan.actions != REUSE).sum()), 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Profile (unless given), fit v1 and v2 at every target, and measure both on the held-out captions."""
    pipe = load_pipeline(None)
    with calibration_profiles(pipe, args) as profiles:
        return _measure(pipe, profiles, args)


@contextmanager
def calibration_profiles(pipe: Any, args: argparse.Namespace) -> Iterator[ProfileSet]:
    """`args.profile`, else a profile of the six calibration captions (seeds 1000–1005) at `args.steps` and
    `args.guidance`, recorded into a temporary folder that lives as long as the context."""
    with tempfile.TemporaryDirectory() as folder:
        profile = args.profile
        if profile is None:
            profile = Path(folder) / "calibration.h5"
            specs = [PromptSpec(text, "", 1000 + i) for i, text in enumerate(CALIBRATION)]
            settings = RecordSettings(num_inference_steps=args.steps, guidance_scale=args.guidance)
            profile_prompts(pipe, specs, profile, settings, progress=True)
        yield load_profiles([profile])


def _measure(pipe: Any, profiles: Any, args: argparse.Namespace) -> dict[str, Any]:
    held_out = [PromptSpec(text, "", seed) for text, seed in EVALUATION]
    references = [held_out_video(pipe, spec, args) for spec in held_out]
    closed_loop = closed_loop_from_profile(pipe, profiles.profiles[0].prompts, profiles.header.settings)
    rows = []
    for target in args.targets:
        for version in args.versions:
            extra, measured = VERSIONS[version]
            options = FitOptions(target_speedup=target, **extra)
            try:
                plan = fit_profiles(profiles, options, closed_loop if measured else None)
            except PlannerError as exc:
                rows.append({"target": target, "version": version, "refused": str(exc)})
                continue
            with apply_plan(pipe, plan):
                videos = [held_out_video(pipe, spec, args) for spec in held_out]
            pooled, worst = pooled_psnr(videos, references)
            rows.append(
                {
                    "target": target,
                    "version": version,
                    "speedup": block_call_speedup(plan),
                    "pooled_psnr": pooled,
                    "worst_psnr": worst,
                    "reuse": plan.policy.get("reuse"),
                    "front_blocks": plan.provenance["chosen"].get("front_blocks", 0),
                    "predicted": plan.predicted,
                }
            )
            print(_row(rows[-1]), flush=True)
    return {"steps": args.steps, "guidance": args.guidance, "held_out": len(held_out), "rows": rows}


def held_out_video(pipe: Any, spec: PromptSpec, args: argparse.Namespace) -> np.ndarray:
    """The video of one held-out caption at `args.steps` and `args.guidance`, the pipeline's own size."""
    return first_video(generate(pipe, spec, args.steps, args.guidance, {}))


def _row(row: dict[str, Any]) -> str:
    if "refused" in row:
        return f"| {row['target']:g}x | {row['version']} | refused: {row['refused']} |"
    return (
        f"| {row['target']:g}x | {row['version']} | {row['speedup']:.2f}x | {row['pooled_psnr']:.1f} | "
        f"{row['worst_psnr']:.1f} | {row['reuse']} | {row['front_blocks']} |"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m dit_accel.bench.heldout`."""
    args = parse_args(argv)
    print("| target | auto | block-call speedup | pooled PSNR (dB) | worst caption (dB) | reuse | front blocks |")
    print("|---|---|---|---|---|---|---|")
    write_report(run(args), args.out)


def write_report(report: dict[str, Any], path: Path | None) -> None:
    """Every number as JSON at `path` (atomically), when a path is given."""
    if path is not None:
        write_bytes_atomic(path, (json.dumps(report, indent=1, default=float) + "\n").encode())


if __name__ == "__main__":
    main()
