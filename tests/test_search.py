"""The exact schedule search and the measured reuse costs it runs on (planner/search.py, planner/reuse_costs.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dit_accel.planner.errors import PlannerError
from dit_accel.planner.reuse_costs import ReuseCosts, fit_beta, reuse_costs
from dit_accel.planner.search import cell_costs, search


def _schedule_cost(reuse: np.ndarray, table: np.ndarray, weights: np.ndarray, max_run: int) -> float:
    """Cost of one schedule walked step by step, as the module docstring defines it (∞ if it breaks a limit)."""
    total, last, gap = 0.0, 0, 0
    for s in range(1, len(reuse)):
        if reuse[s]:
            j = s - last
            if j > max_run:
                return np.inf
            total += weights[s] * table[s, j - 1, gap]
        else:
            gap, last = min(s - last, table.shape[2] - 1), s
    return total


@pytest.mark.parametrize("seed", range(4))
def test_search_finds_the_brute_force_optimum_for_every_number_of_computed_steps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    steps, runs, gaps = 9, 3, 5
    table = rng.uniform(0.1, 2.0, (steps, runs, gaps))
    weights = rng.uniform(0.5, 1.5, steps)
    forced = np.zeros(steps, dtype=bool)
    forced[6] = True
    result = search(table, weights, forced)
    best = np.full(steps + 1, np.inf)
    for tail in itertools.product((False, True), repeat=steps - 1):
        reuse = np.array((False, *tail))
        if reuse[forced].any():
            continue
        n = int((~reuse).sum())
        best[n] = min(best[n], _schedule_cost(reuse, table, weights, runs))
    np.testing.assert_allclose(result.cost, best)
    for n in result.reachable():
        schedule = result.schedule(int(n))
        assert int((~schedule).sum()) == n and not schedule[0] and not schedule[forced].any()
        assert _schedule_cost(schedule, table, weights, runs) == pytest.approx(best[n])


def test_search_reuses_the_last_step_when_it_is_cheap_and_never_reuses_step_zero() -> None:
    steps = 6
    table = np.ones((steps, 2, 4))
    table[-1] = 0.0  # the last step moves sigma by almost nothing
    result = search(table, np.ones(steps))
    schedule = result.schedule(int(steps - 1))
    assert schedule.tolist() == [False, False, False, False, False, True]
    assert result.cost[steps] == 0.0 and np.isinf(result.cost[0])


def test_an_unreachable_number_of_computed_steps_is_refused() -> None:
    result = search(np.ones((6, 1, 3)), np.ones(6))  # runs of one: at least every other step computes
    with pytest.raises(PlannerError, match="no schedule computes exactly 2"):
        result.schedule(2)


def _gram(residuals: np.ndarray, lags: int) -> np.ndarray:
    """[step, lag, lag] Gram of R_{s−i} − R_s, i = 1 … lags, NaN where s − i < 0 (what the profiler records)."""
    steps = residuals.shape[0]
    gram = np.full((steps, lags, lags), np.nan)
    for s in range(steps):
        diffs = [residuals[s - i] - residuals[s] if s - i >= 0 else None for i in range(1, lags + 1)]
        for i, a in enumerate(diffs):
            for k, b in enumerate(diffs):
                if a is not None and b is not None:
                    gram[s, i, k] = float(a.ravel() @ b.ravel())
    return gram


def test_beta_fit_recovers_a_known_slope_and_a_linear_residual_costs_nothing_with_it() -> None:
    rng = np.random.default_rng(0)
    base, direction = rng.normal(size=(16,)), rng.normal(size=(16,))
    residuals = np.stack([base + 0.3 * s * direction for s in range(12)])  # moves along a line
    gram = _gram(residuals, 7)[None, None]
    output_sq = np.full((1, 1, 12), 100.0)
    costs = reuse_costs(gram, output_sq, max_run=3)
    np.testing.assert_allclose(costs.beta, [1.0, 2.0, 3.0], atol=1e-9)  # the full line: j steps of slope at position j
    assert np.nanmax(costs.slope) < 1e-6 and np.nanmin(costs.hold[0, 3:]) > 0.02
    np.testing.assert_allclose(costs.hold[0, 5, 1], np.linalg.norm(residuals[5] - residuals[3]) / 10.0)


def test_beta_is_clipped_to_the_line_and_zero_for_noise() -> None:
    dot = np.array([[[-1.0, -1.0], [5.0, 5.0]]])  # [sample, run position, gap]: position 1 moves back, 2 overshoots
    spread = np.ones_like(dot)
    np.testing.assert_allclose(fit_beta(dot, spread), [0.0, 2.0])


def test_cell_costs_take_the_worst_prompt_and_fall_back_to_hold_without_a_gap() -> None:
    hold = np.stack([np.full((4, 2), 1.0), np.full((4, 2), 3.0)])
    slope = np.stack([np.full((4, 2, 3), 0.5), np.full((4, 2, 3), 0.25)])
    costs = ReuseCosts(hold=hold, slope=slope, beta=np.array([1.0, 1.0]))
    table = cell_costs(costs, "slope", "max")
    assert table[2, 1, 0] == 3.0 and table[2, 1, 2] == 0.5
    assert cell_costs(costs, "hold", "mean")[2, 1, 2] == 2.0
