"""`python -m dit_accel.bench.adacache_gap`: where AdaCache's predicted speed and the held-out speed part.

An AdaCache plan predicts its speedup by replaying the runtime's decisions on the calibration prompts' profiled probe
drift and motion. This replays the same plans on a profile of the twelve held-out captions (recorded here unless
`--held-out-profile` is given; only drift and motion, no plan is fitted on it), so that the two causes of a gap can be
told apart: a wrong simulation (the replay on the held-out profile would then miss the block-call speedup that
`bench.presets` counts) or prompts that differ from the calibration ones (the replay on the held-out profile would
then match the count while the calibration prediction does not). Each plan is fitted with and without MoReg.

    python -m dit_accel.bench.adacache_gap --profile cal.h5 [--held-out-profile held.h5] [--steps 20]
        [--targets 1.5 2] [--out artifacts/adacache_gap.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dit_accel.harness.captions import EVALUATION
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner import FitOptions
from dit_accel.planner.adaptive_fit import simulate_adacache
from dit_accel.planner.methods import fit_profiles
from dit_accel.planner.profiles import ProfileSet, load_profiles
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts

from .heldout import write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, required=True, help="The calibration profile the plans are fitted on.")
    parser.add_argument("--held-out-profile", type=Path, help="A profile of the held-out captions (default: record).")
    parser.add_argument("--steps", type=int, default=20, help="Steps of the held-out profile when recorded here.")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--targets", type=float, nargs="*", default=[1.5, 2.0])
    parser.add_argument("--out", type=Path, help="Write every number as JSON here.")
    return parser.parse_args(argv)


def held_out_profile(args: argparse.Namespace, folder: Path) -> Path:
    """`args.held_out_profile`, else drift and motion of the held-out captions recorded into `folder`."""
    if args.held_out_profile is not None:
        return args.held_out_profile
    path = folder / "held_out.h5"
    specs = [PromptSpec(text, "", seed) for text, seed in EVALUATION]
    settings = RecordSettings(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        record_attention=False,
        record_features=False,
        sensitivity_steps=0,
        reuse_lags=0,
    )
    profile_prompts(load_pipeline(None), specs, path, settings, progress=True)
    return path


def deciding_branch(profiles: ProfileSet, name: str, block: int) -> np.ndarray:
    """Field `name` at `block` on the branch AdaCache decides on (cond, else the only one): [prompt, step]."""
    branches = profiles.header.branches
    return profiles.stack(name)[:, branches.index("cond") if "cond" in branches else 0, :, block].astype(np.float64)


def replayed_speedup(policy: dict[str, Any], profiles: ProfileSet) -> tuple[float, list[float]]:
    """Block-call speedup of `policy` replayed on every prompt of `profiles`: pooled, and per prompt."""
    probe = policy["probe_block"]
    drift = deciding_branch(profiles, "residual_rel_l1", probe)
    drift[:, 0] = 0.0
    motion = deciding_branch(profiles, "motion", probe) if policy["moreg"]["enabled"] else None
    reuse = simulate_adacache(policy, drift, motion)
    per_prompt = reuse.shape[1] / (reuse.shape[1] - reuse.sum(axis=1))
    return float(reuse.size / (reuse.size - reuse.sum())), [float(s) for s in per_prompt]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fit AdaCache at its default and each target, with and without MoReg, and replay each on both prompt sets."""
    calibration = load_profiles([args.profile])
    with tempfile.TemporaryDirectory() as folder:
        held_out = load_profiles([held_out_profile(args, Path(folder))])
        rows = [
            _compare(calibration, held_out, target, moreg)
            for target in (None, *args.targets)
            for moreg in (True, False)
        ]
    return {"calibration": str(args.profile), "rows": rows}


def _compare(calibration: ProfileSet, held_out: ProfileSet, target: float | None, moreg: bool) -> dict[str, Any]:
    """One plan fitted on `calibration`: its prediction and its replay on `held_out`."""
    plan = fit_profiles(calibration, FitOptions(method="adacache", target_speedup=target, moreg=moreg))
    pooled, per_prompt = replayed_speedup(plan.policy, held_out)
    row = {
        "target": target,
        "moreg": moreg,
        "predicted": float(plan.predicted["speedup"]),
        "replayed_on_held_out": pooled,
        "held_out_per_caption": per_prompt,
    }
    print(_row(row), flush=True)
    return row


def _row(row: dict[str, Any]) -> str:
    target = "paper default" if row["target"] is None else f"{row['target']:g}x"
    spread = f"{min(row['held_out_per_caption']):.2f}-{max(row['held_out_per_caption']):.2f}x"
    return (
        f"| {target} | {'on' if row['moreg'] else 'off'} | {row['predicted']:.2f}x | "
        f"{row['replayed_on_held_out']:.2f}x | {spread} |"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m dit_accel.bench.adacache_gap`."""
    args = parse_args(argv)
    print("| fitted at | MoReg | predicted (calibration) | replayed on held-out | per held-out caption |")
    print("|---|---|---|---|---|")
    write_report(run(args), args.out)


if __name__ == "__main__":
    main()
