"""A plan compiled for replay: per-span reuse/store and per-block prune/blend decisions as plain Python tuples.

Decisions are prepared once per run length (number of inference steps) so the hooks only index tuples: no tensor
is read on the host during replay of a static plan. `StepTable.at(step)` gives one step's decisions as a
`StepActions` value: the hooks inside the model read only that value, never the step, so under `torch.compile`
every step with the same actions replays the same graph.

**Step remapping.** A plan fitted at N steps replays a run of M steps by mapping every run step j to the plan step
round(j·(N−1)/(M−1)) on the normalised step grid (for one scheduler and shift, sigma grids of different lengths are
reparametrisations of that position). The plan's leading warm-up steps and trailing computed steps keep their
share of the run (at least one step each). M must lie within [N/2, 2N]: beyond it, reuse windows stretch or shrink
too far from what was measured, and the plan is refused with a message asking to refit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from .errors import PlanError
from .plan import COMPUTE, PRUNE, REUSE, Plan

MIN_STEP_RATIO, MAX_STEP_RATIO = 0.5, 2.0
#: What a reuse step adds (plan policy key `reuse`): the span's last residual R as it is (`hold`), or R moved along its
#: slope D between the last two stored residuals: one step of it at every reuse step (`extrapolate`), or β_j steps at
#: the j-th step of a reuse run, β from the plan's `slope_scale` list (`slope`, fitted by the planner).
REUSE_MODES = ("hold", "extrapolate", "slope", "scale")


@dataclass(frozen=True)
class StepActions:
    """What the block hooks do at one transformer call: the plan's action set at that step.

    Per span: `reuse` (add the cached residual), `store` (cache the residual after computing), `slope`, the
    factor 1 / (steps since the span's previous stored residual) that turns their difference into a per-step slope,
    `None` when there is none or the plan holds its residuals, and `advance`, how many steps along that slope the
    cached residual is moved where it is used (0 for a plain hold), and `gain`, the factor the cached residual is scaled
    by where it is used (1 but for the scaled hold). Per block: `prune` and `blend` (DWS weight). The
    values are plain Python constants compared by value, which is what `torch.compile` guards on: steps with equal
    actions share one graph.
    """

    reuse: tuple[bool, ...]
    store: tuple[bool, ...]
    prune: tuple[bool, ...]
    blend: tuple[float, ...]
    slope: tuple[float | None, ...]
    advance: tuple[float, ...]
    gain: tuple[float, ...]

    def reusing_all(self) -> StepActions:
        """These actions with every span reusing and nothing stored (an adaptive policy's whole-stack reuse)."""
        spans = len(self.reuse)
        return replace(
            self,
            reuse=(True,) * spans,
            store=(False,) * spans,
            slope=(None,) * spans,
            advance=(0.0,) * spans,
            gain=(1.0,) * spans,
        )

    def with_slopes(self, step: int, stored_at: dict[int, int]) -> StepActions:
        """These actions with extrapolation slopes for `step`, given each span's last store step (updated here).

        A span that stores at `step` after an earlier store gets 1 / (steps since that store); the bookkeeping stays
        on the host so compiled graphs see one float per span, never step numbers.
        """
        slopes: list[float | None] = []
        for span, store in enumerate(self.store):
            before = stored_at.get(span) if store else None
            slopes.append(None if before is None else 1.0 / (step - before))
            if store:
                stored_at[span] = step
        return replace(self, slope=tuple(slopes))


@dataclass(frozen=True)
class StepTable:
    """Static decisions for one run length: per span `reuse`/`store`/`advance`/`gain`, per block `prune`/`blend` (DWS
    weight).

    `advance` defaults to 0 everywhere (a plain hold), `gain` to 1.
    """

    steps: int
    reuse: tuple[tuple[bool, ...], ...]
    store: tuple[tuple[bool, ...], ...]
    prune: tuple[tuple[bool, ...], ...]
    blend: tuple[tuple[float, ...], ...]
    advance: tuple[tuple[float, ...], ...] | None = None
    gain: tuple[tuple[float, ...], ...] | None = None
    _actions: tuple[StepActions, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Precompute every step's `StepActions`; a reuse step stores nothing (tables that store always mark it)."""
        actions = []
        for step in range(self.steps):
            reuse = tuple(row[step] for row in self.reuse)
            store = tuple(row[step] and not r for row, r in zip(self.store, reuse, strict=True))
            prune = tuple(row[step] for row in self.prune)
            blend = tuple(row[step] for row in self.blend)
            advance = tuple(row[step] for row in self.advance) if self.advance is not None else (0.0,) * len(reuse)
            gain = tuple(row[step] for row in self.gain) if self.gain is not None else (1.0,) * len(reuse)
            actions.append(StepActions(reuse, store, prune, blend, (None,) * len(reuse), advance, gain))
        object.__setattr__(self, "_actions", tuple(actions))

    def at(self, step: int) -> StepActions:
        """The actions of `step` (no extrapolation slopes: those depend on the branch's history, see replay)."""
        return self._actions[step]


def _edge_runs(actions: np.ndarray) -> tuple[int, int]:
    """(leading, trailing) number of steps at which every block computes."""
    all_compute = np.all(actions == COMPUTE, axis=0)
    lead = int(np.argmin(all_compute)) if not all_compute.all() else all_compute.size
    trail = int(np.argmin(all_compute[::-1])) if not all_compute.all() else all_compute.size
    return lead, trail


def remap_actions(actions: np.ndarray, steps: int) -> np.ndarray:
    """Actions [blocks, N] of a plan mapped onto a run of `steps` steps (see module docstring)."""
    plan_steps = actions.shape[1]
    if steps == plan_steps:
        return actions
    ratio = steps / plan_steps
    if not MIN_STEP_RATIO <= ratio <= MAX_STEP_RATIO:
        raise PlanError(
            f"the plan was fitted for {plan_steps} inference steps and cannot be remapped to {steps} "
            f"(supported: {int(np.ceil(plan_steps * MIN_STEP_RATIO))} to {int(plan_steps * MAX_STEP_RATIO)}); refit "
            f"the plan at {steps} steps"
        )
    remapped = actions[:, source_steps(plan_steps, steps)].copy()
    lead, trail = _edge_runs(actions)
    if lead:
        remapped[:, : max(1, round(lead * ratio))] = COMPUTE
    if trail:
        remapped[:, steps - max(1, round(trail * ratio)) :] = COMPUTE
    return remapped


def build_table(
    actions: np.ndarray,
    spans: list[tuple[int, int]],
    blend: np.ndarray | None,
    store_always: bool,
    slope_scale: tuple[float, ...] = (),
    gains: np.ndarray | None = None,
) -> StepTable:
    """Decisions for one run length from (possibly remapped) actions.

    A span stores its residual after a computed step when the next step reuses it or prunes with a blend (DWS needs
    the cached output); `store_always` (adaptive policies, which decide online, and slope modes) stores after every
    computed step. `slope_scale[j − 1]` is how far along its slope the cache moves at the j-th step after the span's
    last stored residual (the last entry for longer runs; empty: a plain hold). `gains[s, j − 1]` scales the cache
    reused at step s, the j-th step after the span's last stored residual (the last column for longer runs; None: 1).
    """
    steps = actions.shape[1]
    prune = tuple(tuple(bool(a == PRUNE) for a in row) for row in actions)
    weights = blend if blend is not None else np.ones(actions.shape, np.float32)
    blend_rows = tuple(tuple(float(w) for w in row) for row in weights)
    reuse_rows, store_rows, advance_rows, gain_rows = [], [], [], []
    for start, stop in spans:
        reuse = tuple(bool(a == REUSE) for a in actions[start])
        needs_cache = [
            reuse[s] or any(prune[b][s] and blend_rows[b][s] < 1.0 for b in range(start, stop)) for s in range(steps)
        ]
        store = tuple(store_always or (not reuse[s] and s + 1 < steps and needs_cache[s + 1]) for s in range(steps))
        reuse_rows.append(reuse)
        store_rows.append(store)
        advance_rows.append(_advance_row(reuse, needs_cache, slope_scale))
        gain_rows.append(_gain_row(reuse, gains))
    return StepTable(
        steps,
        tuple(reuse_rows),
        tuple(store_rows),
        prune,
        blend_rows,
        tuple(advance_rows) if slope_scale else None,
        tuple(gain_rows) if gains is not None else None,
    )


def _advance_row(reuse: tuple[bool, ...], uses_cache: list[bool], slope_scale: tuple[float, ...]) -> tuple[float, ...]:
    """Per step, how far the span's cache moves along its slope where it is used: β of the step's position after
    the last stored residual (every step that does not reuse stores one)."""
    row, position = [], 0
    for reused, used in zip(reuse, uses_cache, strict=True):
        position += 1
        row.append(slope_scale[min(position, len(slope_scale)) - 1] if used and slope_scale else 0.0)
        if not reused:
            position = 0
    return tuple(row)


def _gain_row(reuse: tuple[bool, ...], gains: np.ndarray | None) -> tuple[float, ...]:
    """Per step, the scaled hold's gain where the span reuses (1 elsewhere): `gains` at the step and its position
    after the span's last computed step."""
    row, position = [], 0
    for step, reused in enumerate(reuse):
        position = position + 1 if reused else 0
        use = reused and gains is not None
        row.append(float(gains[step, min(position, gains.shape[1]) - 1]) if use else 1.0)
    return tuple(row)


class CompiledSchedule:
    """A plan's spans and its step tables, built lazily per run length."""

    def __init__(self, plan: Plan, adaptive: bool, breaks: tuple[int, ...] = ()) -> None:
        self.plan = plan
        self.adaptive = adaptive
        self.reuse_mode = plan.policy.get("reuse", "hold")
        if self.reuse_mode not in REUSE_MODES:
            raise PlanError(f"plan policy 'reuse' is {self.reuse_mode!r}; this runtime knows {', '.join(REUSE_MODES)}")
        blocks = plan.num_blocks
        spans = [(0, blocks)] if adaptive else sorted(set(plan.span_of_block()))
        self.spans: list[tuple[int, int]] = split_spans(spans, breaks)
        self.span_of_block = [
            next(i for i, (a, b) in enumerate(self.spans) if a <= block < b) for block in range(blocks)
        ]
        blend = plan.arrays.get("dws_weight")
        self._blend = None if blend is None else np.asarray(blend, np.float32)
        self._check_blend()
        self._gains = self._reuse_gains()
        self.table = lru_cache(maxsize=8)(self._table)

    def _check_blend(self) -> None:
        if self._blend is None:
            return
        if self._blend.shape != self.plan.actions.shape:
            raise PlanError(
                f"plan array 'dws_weight' has shape {self._blend.shape}, expected {self.plan.actions.shape}"
            )
        if np.any((self._blend < 0) | (self._blend > 1)):
            raise PlanError("plan array 'dws_weight' must hold weights in [0, 1]")
        for block, row in enumerate(self.plan.actions):
            blended = np.any((row == PRUNE) & (self._blend[block] < 1.0))
            start, stop = self.spans[self.span_of_block[block]]
            if blended and stop - start > 1:
                raise PlanError(
                    f"block {self.plan.model.block_ids[block]} blends pruned and cached outputs (DWS) but shares "
                    f"span [{start}, {stop}); DWS blocks must be cached alone"
                )

    def _reuse_gains(self) -> np.ndarray | None:
        """The scaled hold's gains [plan step, run position] (`scale` mode only).

        Raises:
            PlanError: a `scale` plan without a `reuse_gain` array of one row per plan step.
        """
        if self.reuse_mode != "scale":
            return None
        gains = self.plan.arrays.get("reuse_gain")
        if gains is None or gains.ndim != 2 or gains.shape[0] != self.plan.num_inference_steps or gains.shape[1] < 1:
            raise PlanError("plan policy 'reuse: scale' needs array 'reuse_gain' with one row per step; refit the plan")
        return np.asarray(gains, np.float64)

    def action_sets(self, steps: int) -> set[StepActions]:
        """The distinct actions of a static plan over a run of `steps` steps (`torch.compile` builds one graph each)."""
        table, stored_at = self.table(steps), {}
        actions = [table.at(step) for step in range(steps)]
        if self.extrapolate:
            actions = [a.with_slopes(step, stored_at) for step, a in enumerate(actions)]
        return set(actions)

    def _table(self, steps: int) -> StepTable:
        actions = remap_actions(self.plan.actions, steps)
        blend = None if self._blend is None else self._blend[:, source_steps(self.plan.num_inference_steps, steps)]
        gains = None if self._gains is None else self._gains[source_steps(self.plan.num_inference_steps, steps)]
        return build_table(
            actions,
            self.spans,
            blend,
            store_always=self.adaptive or self.extrapolate,
            slope_scale=self.slope_scale,
            gains=gains,
        )

    @property
    def extrapolate(self) -> bool:
        """Whether reuse steps move the cached residual along its slope (a residual is kept at every computed step)."""
        return self.reuse_mode in ("extrapolate", "slope")

    @property
    def slope_scale(self) -> tuple[float, ...]:
        """Steps along the slope per position in a reuse run: the plan's `slope_scale`, one for `extrapolate`."""
        if self.reuse_mode == "extrapolate":
            return (1.0,)
        if self.reuse_mode == "slope":
            return tuple(float(b) for b in self.plan.policy["slope_scale"])
        return ()


def split_spans(spans: list[tuple[int, int]], breaks: tuple[int, ...]) -> list[tuple[int, int]]:
    """`spans` cut after every block in `breaks` (the adapter's `span_breaks`): replaying the pieces is exact, since
    a span replays like its blocks cached one by one."""
    pieces = []
    for start, stop in spans:
        bounds = [start, *(b + 1 for b in breaks if start <= b < stop - 1), stop]
        pieces.extend(zip(bounds, bounds[1:]))
    return pieces


def source_steps(plan_steps: int, steps: int) -> np.ndarray:
    """For each step of a run of `steps`, the plan step it follows: the nearest at the same relative position."""
    return np.rint(np.arange(steps) * (plan_steps - 1) / max(steps - 1, 1)).astype(int)
