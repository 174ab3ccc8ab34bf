"""Budget solving: the schedule with the least predicted error under a FLOP budget (or the most speed under an error
cap).

`greedy_schedule` starts from computing everything and repeatedly makes the single change (compute → reuse,
compute → prune, prune → reuse of one unit at one step) with the least weighted predicted error added per FLOP
saved, until the target speedup is reached, or while the error cap allows. A unit is a block, a contiguous run of
blocks with one label, or the whole stack (`block_units`); the blocks of a unit share one schedule, which replays as
one cached span. `restore_schedule` runs the same search
backwards (reuse/prune → compute, most error removed per FLOP added) to tighten a plan. Protected steps never change
and no block reuses more than `max_run` steps in a row. Ties go to the lowest block, step and change, so the result
is deterministic.

Methods whose schedule follows from one knob (a refresh interval, a threshold) instead sweep the knob and keep the
best candidate that meets the budget (`choose_candidate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dit_accel.runtime.plan import COMPUTE, PRUNE, REUSE

from .errors import PlannerError
from .predict import Predictor
from .shapes import longest_reuse_run

GRANULARITIES = ("block", "label", "stack")
FORWARD = ((COMPUTE, REUSE), (COMPUTE, PRUNE), (PRUNE, REUSE))
RESTORE = ((REUSE, COMPUTE), (PRUNE, COMPUTE))
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Budget:
    """At most one of: a FLOP speedup to reach, or a predicted error not to exceed."""

    target_speedup: float | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        if self.target_speedup is not None and self.max_error is not None:
            raise PlannerError("give either --target-speedup or --max-error, not both")
        if self.target_speedup is not None and not (np.isfinite(self.target_speedup) and self.target_speedup >= 1.0):
            raise PlannerError(f"--target-speedup must be a number >= 1, got {self.target_speedup}")
        if self.max_error is not None and not (np.isfinite(self.max_error) and self.max_error >= 0.0):
            raise PlannerError(f"--max-error must be a number >= 0, got {self.max_error}")

    @property
    def given(self) -> bool:
        return self.target_speedup is not None or self.max_error is not None

    def to_json(self) -> dict[str, float | None]:
        return {"target_speedup": self.target_speedup, "max_error": self.max_error}


@dataclass
class _Search:
    """Greedy single-change search over a schedule whose units (groups of blocks) share one row each."""

    predictor: Predictor
    actions: np.ndarray
    units: Sequence[np.ndarray]
    movable: np.ndarray
    transitions: Sequence[tuple[int, int]]
    max_run: int
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.actions = self.actions.copy()
        self.error = self.predictor.error(self.actions)
        self.flops = self.predictor.total_flops(self.actions)
        self.rows = [self._candidates(u) for u in range(len(self.units))]

    def _candidates(self, unit: int) -> dict[str, np.ndarray]:
        blocks = self.units[unit]
        row = self.actions[blocks[0]]
        pairs = sorted(
            (int(s), index)
            for index, (source, _) in enumerate(self.transitions)
            for s in np.flatnonzero((row == source) & self.movable)
        )
        steps = np.array([s for s, _ in pairs], dtype=np.int64)
        targets = np.array([self.transitions[i][1] for _, i in pairs], dtype=np.uint8)
        rows = np.repeat(row[None], len(pairs) + 1, axis=0)
        rows[np.arange(1, len(pairs) + 1), steps] = targets
        error, weighted, flops = self.predictor.unit_costs(blocks, rows)
        d_error, d_weighted, d_flops = error[1:] - error[0], weighted[1:] - weighted[0], flops[1:] - flops[0]
        valid = (longest_reuse_run(rows[1:]) <= self.max_run) & (d_flops != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            key = np.where(valid, d_weighted / np.abs(d_flops), np.inf)
        return {"step": steps, "target": targets, "d_error": d_error, "d_flops": d_flops, "key": key}

    def best(self, error_cap: float = np.inf) -> tuple[int, int] | None:
        """(unit, candidate index) of the best change keeping the predicted error ≤ `error_cap`, or None."""
        best_key, best = np.inf, None
        for unit, row in enumerate(self.rows):
            keys = np.where(self.error + row["d_error"] <= error_cap + TOLERANCE, row["key"], np.inf)
            if keys.size and keys.min() < best_key:
                best_key, best = keys.min(), (unit, int(np.argmin(keys)))
        return best

    def apply(self, unit: int, index: int) -> None:
        row = self.rows[unit]
        self.actions[self.units[unit], row["step"][index]] = row["target"][index]
        self.error += row["d_error"][index]
        self.flops += row["d_flops"][index]
        self.rows[unit] = self._candidates(unit)

    def speedup(self) -> float:
        return self.predictor.full_flops() / self.flops


def block_units(blocks: int, granularity: str, labels: Sequence[str]) -> list[np.ndarray]:
    """Groups of blocks that share one schedule: each block, each contiguous run of one label, or the whole stack."""
    if granularity == "block":
        return [np.array([b]) for b in range(blocks)]
    if granularity == "stack":
        return [np.arange(blocks)]
    if granularity != "label":
        raise PlannerError(f"unknown granularity {granularity!r} (known: {', '.join(GRANULARITIES)})")
    starts = [0] + [b for b in range(1, blocks) if labels[b] != labels[b - 1]]
    return [np.arange(start, stop) for start, stop in zip(starts, starts[1:] + [blocks])]


def greedy_schedule(
    predictor: Predictor,
    protected: np.ndarray,
    budget: Budget,
    max_run: int,
    prune: bool,
    units: Sequence[np.ndarray] | None = None,
    strict: bool = True,
) -> np.ndarray:
    """The least-error schedule found by greedy search that meets `budget` (see the module docstring).

    `units` are groups of blocks that share one schedule (default: every block alone). An unreachable target speedup
    raises, unless `strict` is off: then the fastest schedule found is returned.
    """
    transitions = FORWARD if prune and predictor.can_prune else FORWARD[:1]
    units = units if units is not None else [np.array([b]) for b in range(predictor.shape[0])]
    search = _Search(predictor, np.zeros(predictor.shape, dtype=np.uint8), units, ~protected, transitions, max_run)
    cap = np.inf if budget.max_error is None else budget.max_error
    while budget.target_speedup is None or search.speedup() < budget.target_speedup - TOLERANCE:
        move = search.best(cap)
        if move is None:
            if budget.target_speedup is not None and strict:
                raise PlannerError(
                    f"target speedup {budget.target_speedup:g}x is impossible: at most {search.speedup():.3f}x with "
                    f"{int(protected.sum())} protected steps and at most {max_run} reuses in a row"
                )
            break
        search.apply(*move)
    return search.actions


def restore_schedule(
    predictor: Predictor,
    actions: np.ndarray,
    max_error: float,
    min_cells: int,
    units: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Recompute cells (most error removed per FLOP first) until error ≤ `max_error` and ≥ `min_cells` cells changed.

    `units` (blocks sharing one row, e.g. a plan's spans) change together, so synchronised schedules stay synchronised.
    """
    units = units if units is not None else [np.array([b]) for b in range(actions.shape[0])]
    search = _Search(predictor, actions, units, np.ones(actions.shape[1], dtype=bool), RESTORE, actions.shape[1])
    changed = 0
    while search.error > max_error + TOLERANCE or changed < min_cells:
        move = search.best()
        if move is None:
            break
        search.apply(*move)
        changed += len(units[move[0]])
    return search.actions


@dataclass(frozen=True)
class Candidate:
    """One schedule a method can produce: its knob settings and predicted speedup and error."""

    params: dict[str, Any]
    speedup: float
    error: float
    result: Any = None


def choose_candidate(candidates: Sequence[Candidate], budget: Budget, method: str) -> Candidate:
    """The candidate with least error reaching the target speedup, or most speedup within the error cap."""
    if budget.target_speedup is not None:
        fit = [c for c in candidates if c.speedup >= budget.target_speedup - TOLERANCE]
        if not fit:
            best = max(c.speedup for c in candidates)
            raise PlannerError(
                f"target speedup {budget.target_speedup:g}x is impossible for method {method}: at most {best:.3f}x "
                "on this profile"
            )
        return min(fit, key=lambda c: (c.error, -c.speedup))
    fit = [c for c in candidates if c.error <= budget.max_error + TOLERANCE]
    if not fit:
        least = min(c.error for c in candidates)
        raise PlannerError(
            f"max error {budget.max_error:g} is impossible for method {method}: its most accurate plan has predicted "
            f"error {least:.4g}"
        )
    return max(fit, key=lambda c: (c.speedup, -c.error))
