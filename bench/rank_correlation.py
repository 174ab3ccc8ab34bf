"""`python -m dit_accel.bench.rank_correlation`: does `auto`'s error model rank schedules like the closed loop does?

Takes a calibration profile with measured reuse costs, builds `--candidates` whole-stack schedules of every kind the
search produces (hold and slope, least-cost schedules at every reachable number of computed steps, plus random
schedules within the run limit to widen the spread), predicts each one's worst-prompt error from the profile
(`search.walk_cost` on the worst-prompt cell costs, the number the planner stores as `predicted.error`) and measures
it with the closed loop (relative final-latent error on the profile's calibration prompts, the worst prompt). It
prints the Spearman rank correlation of the two and every pair; `docs/planner.md` quotes it.

    python -m dit_accel.bench.rank_correlation --profile calibration.h5 [--candidates 24] [--out pairs.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from dit_accel.harness.files import write_bytes_atomic
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.planner import FitOptions
from dit_accel.planner.closed_loop import closed_loop_from_profile
from dit_accel.planner.methods import (
    build_context,
    candidate_plan,
    measured_candidate,
    measured_costs,
    measured_weights,
)
from dit_accel.planner.profiles import load_profiles
from dit_accel.planner.search import cell_costs, search


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, required=True, help="Calibration profile with reuse costs.")
    parser.add_argument("--candidates", type=int, default=24, help="Schedules to predict and measure.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random schedules.")
    parser.add_argument("--out", type=Path, help="Write every pair as JSON here.")
    return parser.parse_args(argv)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def schedules(context: Any, costs: Any, weights: np.ndarray, count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(reuse mode, reuse mask) pairs: least-cost schedules of both modes at every reachable step count, then random
    ones (step 0 computed, runs within the limit) until `count`; no duplicates."""
    found: dict[tuple[str, bytes], np.ndarray] = {}
    for mode in ("hold", "slope"):
        result = search(cell_costs(costs, mode, "max"), weights)
        for computed in result.reachable():
            if 1 < computed < context.steps:
                reuse = result.schedule(int(computed))
                found.setdefault((mode, reuse.tobytes()), reuse)
    chosen = sorted(found.items(), key=lambda item: (item[0][0], int(item[1].sum())))
    step = max(1, len(chosen) // max(1, count // 2))
    picked = [(mode, reuse) for (mode, _), reuse in chosen[::step]][: count // 2]
    rng = np.random.default_rng(seed)
    while len(picked) < count:
        reuse = rng.random(context.steps) < rng.uniform(0.2, 0.7)
        reuse[0] = False
        if _longest_run(reuse) <= costs.max_run:
            picked.append((str(rng.choice(["hold", "slope"])), reuse))
    return picked


def _longest_run(reuse: np.ndarray) -> int:
    longest = run = 0
    for value in reuse:
        run = run + 1 if value else 0
        longest = max(longest, run)
    return longest


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Predict and measure every schedule; the correlation and the pairs."""
    profiles = load_profiles([args.profile])
    context = build_context(profiles, FitOptions())
    costs = measured_costs(context)
    weights = measured_weights(context, costs)
    pipe = load_pipeline(None)
    loop = closed_loop_from_profile(pipe, profiles.profiles[0].prompts, profiles.header.settings)
    pairs = []
    for mode, reuse in schedules(context, costs, weights, args.candidates, args.seed):
        candidate = measured_candidate(context, costs, weights, (mode, "max"), reuse)
        measured = loop.measure(candidate_plan(context, candidate))
        pairs.append(
            {
                "reuse": mode,
                "computed_steps": int((~reuse).sum()),
                "predicted": float(candidate["error"]),
                "measured_worst": float(measured.max()),
            }
        )
        print(json.dumps(pairs[-1]), flush=True)
    predicted = np.array([p["predicted"] for p in pairs])
    measured = np.array([p["measured_worst"] for p in pairs])
    return {
        "steps": context.steps,
        "prompts": len(loop.prompts),
        "spearman": spearman(predicted, measured),
        "pairs": pairs,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m dit_accel.bench.rank_correlation`."""
    args = parse_args(argv)
    report = run(args)
    print(f"Spearman rank correlation over {len(report['pairs'])} schedules: {report['spearman']:.3f}")
    if args.out is not None:
        write_bytes_atomic(args.out, (json.dumps(report, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
