"""Measured refinement (planner/refine.py): local search on closed-loop measurements finds known best schedules."""

from __future__ import annotations

import numpy as np
import pytest

from dit_accel.planner.closed_loop import tail_error
from dit_accel.planner.refine import evenly_spaced, neighbours, refine

STEPS = 20


def _schedule(computed: list[int]) -> np.ndarray:
    reuse = np.ones(STEPS, dtype=bool)
    reuse[computed] = False
    return reuse


def _fixed(*steps: int) -> np.ndarray:
    fixed = np.zeros(STEPS, dtype=bool)
    fixed[[0, *steps]] = True
    return fixed


class FakeLoop:
    """Per-prompt error = prompt scale × distance of the computed steps from a target schedule; honours the
    closed loop's contract (prompt order, stop once the tail error cannot beat the bound) and counts generations."""

    def __init__(self, target: list[int], scales: list[float]):
        self.target = np.array(target)
        self.scales = np.array(scales)
        self.generations = 0

    def error(self, reuse: np.ndarray) -> np.ndarray:
        distance = np.abs(np.flatnonzero(~reuse) - self.target).sum()
        return self.scales * (1.0 + distance)

    def __call__(self, reuse: np.ndarray, order: list[int], bound: float | None) -> np.ndarray:
        full, errors = self.error(reuse), np.full(self.scales.size, np.nan)
        for index in order:
            self.generations += 1
            errors[index] = full[index]
            if bound is not None and tail_error(errors) >= bound:
                break
        return errors


def test_tail_error_is_the_worst_quarter_and_a_lower_bound_while_prompts_are_missing():
    errors = np.array([0.1, 0.4, 0.2, 0.8, 0.3, 0.5, 0.05, 0.6])
    assert tail_error(errors) == pytest.approx((0.8 + 0.6) / 2)
    partial = errors.copy()
    partial[[0, 3, 5]] = np.nan
    assert tail_error(partial) <= tail_error(errors)
    assert tail_error(np.array([0.3, np.inf])) == np.inf
    assert tail_error(np.array([0.2, 0.7, 0.1])) == pytest.approx(0.7)


def test_neighbours_keep_the_count_the_fixed_steps_and_the_run_limit():
    reuse = _schedule([0, 1, 5, 9, 13, 17])
    fixed = _fixed(9)
    found = neighbours(reuse, fixed, max_run=4)
    assert found and len({s.tobytes() for _, s in found}) == len(found)
    for (source, target), schedule in found:
        assert (~schedule).sum() == (~reuse).sum()
        assert not schedule[0] and not schedule[9] and source != 9
        assert abs(source - target) in (1, 2) and schedule[source] and not schedule[target]
        run = longest = 0
        for value in schedule:
            run = run + 1 if value else 0
            longest = max(longest, run)
        assert longest <= 4


def test_refinement_walks_to_the_best_schedule_and_stops_rejected_moves_early():
    target = [0, 3, 6, 10, 13, 16]
    loop = FakeLoop(target, [1.0, 2.0, 0.5, 3.0, 1.5, 0.7, 2.5, 1.1])
    start = _schedule([0, 1, 2, 3, 12, 17])
    result = refine(start, loop.error(start), loop, _fixed(), max_run=6, rounds=20)
    assert list(np.flatnonzero(~result.reuse)) == target
    assert np.allclose(result.errors, loop.error(result.reuse))
    assert result.rounds == len(result.moves) and result.rounds >= 4
    assert loop.generations < result.tried * loop.scales.size / 2  # most rejected moves stop after a prompt or two


def test_refinement_keeps_a_schedule_no_move_improves_and_honours_zero_rounds():
    target = [0, 3, 6, 10, 13, 16]
    loop = FakeLoop(target, [1.0, 2.0])
    best = _schedule(target)
    result = refine(best, loop.error(best), loop, _fixed(), max_run=6, rounds=3)
    assert result.rounds == 0 and np.array_equal(result.reuse, best) and result.tried > 0
    start = _schedule([0, 1, 2, 3, 12, 17])
    untouched = refine(start, loop.error(start), loop, _fixed(), max_run=6, rounds=0)
    assert untouched.tried == 0 and np.array_equal(untouched.reuse, start)


def test_evenly_spaced_schedules_start_at_zero_and_respect_forced_steps():
    reuse = evenly_spaced(STEPS, 5, _fixed())
    assert list(np.flatnonzero(~reuse)) == [0, 4, 8, 12, 16]
    assert evenly_spaced(STEPS, 5, _fixed(8)) is not None
    assert evenly_spaced(STEPS, 5, _fixed(9)) is None
