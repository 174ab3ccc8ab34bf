"""Measured refinement: improve `auto`'s schedule by local search on what the closed loop measures.

The search on measured reuse costs (`search.py`) is exact for its cost model, but that model prices each reused step
under teacher forcing and adds the prices up: how errors compound over a long run of reused steps it only
approximates. At high speedups that is where it ranks schedules wrongly — at 20 steps and 3.3x, its pick (reuse runs of
six) measured a worst calibration prompt four times its prediction, while evenly spaced runs of three measured half of
that. An offline planner can afford to measure instead: starting from the best measured candidate, refinement moves
one computed step at a time by one or two steps (the number of computed steps, so the speedup, stays the same),
replays each neighbour on the calibration prompts, and keeps the best one when it lowers the robust measured error
(`closed_loop.tail_error`), round after round, until no move helps or the rounds run out.

Each neighbour's prompts are generated worst-first (the incumbent's order), and a neighbour is dropped as soon as the
prompts measured so far prove that it cannot beat the incumbent, so most rejected moves cost one or two generations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dit_accel.runtime.plan import COMPUTE, REUSE

from .closed_loop import tail_error
from .shapes import longest_reuse_run

#: How far refinement moves one computed step (in steps, either way).
MOVES = (1, 2)
#: A move is kept only when it lowers the robust measured error by more than this share (ignores rounding noise).
MIN_GAIN = 0.005
#: Default number of refinement rounds (each tries every move of every movable computed step once).
DEFAULT_ROUNDS = 3

#: Measures a schedule (True = reuse) in the given prompt order; NaN where it stopped early because it cannot beat
#: the bound.
Measure = Callable[[np.ndarray, list[int], float | None], np.ndarray]


@dataclass
class Refinement:
    """Where refinement ended: the schedule, its measured errors per prompt, and what it tried."""

    reuse: np.ndarray
    errors: np.ndarray
    tried: int = 0
    rounds: int = 0
    moves: list[tuple[int, int]] = field(default_factory=list)


def neighbours(reuse: np.ndarray, fixed: np.ndarray, max_run: int) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Schedules with one computed step moved by one of `MOVES`, as ((from, to), schedule), in a fixed order.

    Steps in `fixed` (step 0 and the user's forced steps) neither move nor receive a move; no neighbour has a reuse
    run longer than `max_run` (the longest run the measured costs price).
    """
    found, seen = [], set()
    for step in np.flatnonzero(~reuse):
        if fixed[step]:
            continue
        for distance in MOVES:
            for target in (step - distance, step + distance):
                if not 0 < target < reuse.size or fixed[target] or not reuse[target]:
                    continue
                moved = reuse.copy()
                moved[step], moved[target] = True, False
                key = moved.tobytes()
                if key not in seen and longest_reuse_run(np.where(moved, REUSE, COMPUTE)) <= max_run:
                    seen.add(key)
                    found.append(((int(step), int(target)), moved))
    return found


def refine(
    reuse: np.ndarray, errors: np.ndarray, measure: Measure, fixed: np.ndarray, max_run: int, rounds: int
) -> Refinement:
    """Hill-climb `reuse` (measured `errors` per prompt) on the robust measured error, best move per round.

    Args:
        reuse: the starting schedule (True = reuse), fully measured.
        errors: its measured error per calibration prompt.
        measure: replays a schedule (see `Measure`).
        fixed: steps that must keep their action.
        max_run: longest reuse run allowed.
        rounds: most rounds to run (0: return the start unchanged).
    """
    state = Refinement(reuse.copy(), np.asarray(errors, dtype=np.float64).copy())
    for _ in range(rounds):
        best = None
        bound = tail_error(state.errors) * (1 - MIN_GAIN)
        order = [int(i) for i in np.argsort(-state.errors, kind="stable")]
        for move, schedule in neighbours(state.reuse, fixed, max_run):
            state.tried += 1
            measured = measure(schedule, order, bound)
            if np.isnan(measured).any() or tail_error(measured) >= bound:
                continue
            best, bound = (move, schedule, measured), tail_error(measured)
        if best is None:
            break
        state.rounds += 1
        state.moves.append(best[0])
        state.reuse, state.errors = best[1], best[2]
    return state


def evenly_spaced(steps: int, computed: int, fixed: np.ndarray) -> np.ndarray | None:
    """The schedule computing `computed` steps spread evenly from step 0 (True = reuse), or None when the steps in
    `fixed` do not fall on it. It is MagCache's shape at a constant magnitude ratio, and a start far from the
    cost model's front-loaded picks."""
    reuse = np.ones(steps, dtype=bool)
    reuse[np.floor(np.arange(computed) * steps / computed).astype(int)] = False
    return reuse if not np.any(fixed & reuse) else None
