"""Exact schedule search: dynamic programming over whole-stack compute/reuse sequences on measured reuse costs.

A whole-stack schedule is a sequence of steps that compute or reuse. What reusing step s costs depends only on how
long ago the last computed step was (run position j) and, with a calibrated slope, on the gap g between the last
two computed steps (`reuse_costs.py`). So the least-cost schedule with n computed steps is found exactly by dynamic
programming over states (j, g, n), step by step: O(T · K · G · T) for T steps, runs of at most K and gaps up to G.

The cost of a schedule is Σ_s w_s · c(s, j, g): w_s turns a velocity-level error at step s into final-latent error
(|σ_s − σ_{s+1}| with the profile's measured step sensitivity), and c is a *robust* error over calibration prompts:
the worst prompt's error in each cell (`robust="max"`, an upper bound of the worst prompt's total), or the mean.
Nothing is protected by rule: step 0 computes because nothing is cached yet, and every other step, the last
included, computes only when the measured costs say so, or when the user forces it (`forced`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlannerError
from .reuse_costs import ReuseCosts

ROBUST = ("max", "mean")
REUSE_MODES = ("hold", "slope", "scale")


@dataclass(frozen=True)
class SearchResult:
    """The least cost for every number of computed steps, and a way to recover each schedule."""

    cost: np.ndarray
    _choices: np.ndarray
    _final: np.ndarray

    def reachable(self) -> np.ndarray:
        """Numbers of computed steps for which some schedule exists."""
        return np.flatnonzero(np.isfinite(self.cost))

    def schedule(self, computed: int) -> np.ndarray:
        """Boolean [steps]: True where the least-cost schedule with `computed` computed steps reuses."""
        if not np.isfinite(self.cost[computed]):
            raise PlannerError(f"no schedule computes exactly {computed} steps under the run limits")
        steps = self._choices.shape[0]
        j, g = (int(v) for v in self._final[computed])
        n = computed
        reuse = np.zeros(steps, dtype=bool)
        for s in range(steps - 1, 0, -1):
            reuse[s] = j > 0
            j, g, n = (int(v) for v in self._choices[s, j, g, n])
        return reuse


def cell_costs(costs: ReuseCosts, mode: str, robust: str) -> np.ndarray:
    """[step, run position j (1…K), previous gap g (0 = none, 1…G)] robust error of reusing there.

    With no previous gap (one computed step so far) or in `hold` mode, the cost is the plain hold's; in `scale` mode,
    the scaled hold's at every gap.
    """
    if mode not in REUSE_MODES or robust not in ROBUST:
        raise PlannerError(f"unknown reuse mode {mode!r} or robust aggregate {robust!r}")
    if mode == "scale" and costs.scaled is None:
        raise PlannerError("the scaled hold needs profile field stack_residual_sq; re-profile")
    reduce = np.max if robust == "max" else np.mean
    hold = reduce(costs.scaled if mode == "scale" else costs.hold, axis=0)
    steps, runs = hold.shape
    table = np.empty((steps, runs, costs.max_gap + 1))
    table[:] = hold[:, :, None]
    if mode == "slope":
        slope = reduce(costs.slope, axis=0)
        table[:, :, 1:] = np.where(np.isfinite(slope), slope, np.inf)
    return np.where(np.isfinite(table), table, np.inf)


def search(table: np.ndarray, weights: np.ndarray, forced: np.ndarray | None = None) -> SearchResult:
    """Least-cost schedules for every number of computed steps (see the module docstring).

    Args:
        table: [step, run position, gap] cell costs from `cell_costs` (∞ where reuse is impossible).
        weights: [step] weight of a step's error in the final latent.
        forced: [step] booleans of steps that must compute (step 0 always does).

    Raises:
        PlannerError: `weights` or `forced` do not match the table's steps.
    """
    steps, runs, gaps = table.shape
    weights = np.asarray(weights, np.float64)
    forced = np.zeros(steps, dtype=bool) if forced is None else np.asarray(forced, dtype=bool)
    if weights.shape != (steps,) or forced.shape != (steps,):
        raise PlannerError(f"weights {weights.shape} / forced {forced.shape} do not match {steps} steps")
    # dp[j, g, n]: least cost of steps 0…s ending at run position j, previous gap g, n computed steps.
    dp = np.full((runs + 1, gaps, steps + 1), np.inf)
    dp[0, 0, 1] = 0.0
    choices = np.zeros((steps, runs + 1, gaps, steps + 1, 3), dtype=np.int16)
    for s in range(1, steps):
        nxt = np.full_like(dp, np.inf)
        pick = np.zeros((runs + 1, gaps, steps + 1, 3), dtype=np.int16)
        for j in range(runs + 1):
            for g in range(gaps):
                here = dp[j, g]
                if not np.isfinite(here).any():
                    continue
                gap = min(j + 1, gaps - 1)
                shifted = np.concatenate(([np.inf], here[:-1]))
                better = shifted < nxt[0, gap]
                nxt[0, gap] = np.where(better, shifted, nxt[0, gap])
                pick[0, gap][better] = (j, g, 0)
                pick[0, gap][better, 2] = np.flatnonzero(better) - 1
                if forced[s] or j + 1 > runs:
                    continue
                cost = here + weights[s] * table[s, j, g]
                better = cost < nxt[j + 1, g]
                nxt[j + 1, g] = np.where(better, cost, nxt[j + 1, g])
                pick[j + 1, g][better] = (j, g, 0)
                pick[j + 1, g][better, 2] = np.flatnonzero(better)
        dp, choices[s] = nxt, pick
    flat = dp.reshape(-1, steps + 1)
    best = flat.argmin(axis=0)
    final = np.stack(np.unravel_index(best, dp.shape[:2]), axis=1)
    return SearchResult(flat.min(axis=0), choices, final)


def walk_cost(reuse: np.ndarray, table: np.ndarray, weights: np.ndarray) -> float:
    """Cost of one schedule (True = reuse) under `table` and `weights`, walked step by step (∞ past the run limit)."""
    total, last, gap = 0.0, 0, 0
    runs, gaps = table.shape[1], table.shape[2]
    for s in range(1, len(reuse)):
        if not reuse[s]:
            gap, last = min(s - last, gaps - 1), s
            continue
        if s - last > runs:
            return float("inf")
        total += float(weights[s] * table[s, s - last - 1, gap])
    return total
