"""Adaptive policies replayed from a plan's calibrated parameters: AdaCache (+MoReg) and BWCache.

Both decide online which steps reuse the whole stack's cached residual. The decisions are made in one place, the
tensor-free `AdaCacheDecisions` and `BWCacheDecisions` below: the replay hooks (`AdaCachePolicy`, `BWCachePolicy`)
feed them numbers measured on the model, and the planner's simulation (`planner/adaptive_fit.py`) feeds them the
numbers it derives from a profile, so a plan's predicted schedule and its replayed one follow the same rules.

**Steps.** Steps < protect_first and ≥ T − protect_last compute. Elsewhere a step reuses while the reuse counter is
positive (counter − 1); bwcache's refresh steps, (s − protect_first) % refresh_every == 0 when a plan has
`refresh_every`, compute regardless and leave the counter as it is. Every computed step s after an earlier computed
step c measures a distance D between s and c and sets the counter from d = D / (s − c), the distance per elapsed
step.

**adacache** `{probe_block, codebook: [[threshold, reuse_steps], …], moreg: {enabled, norm, exponent, gradient_scale,
active}, protect_first, protect_last}`. D = ‖p_s − p_c‖₁ / ‖p_c‖₁ on the probe block's residual p, normalised by the
cached (earlier) residual as in the authors' code and the profiler's `residual_rel_l1`. With MoReg enabled,
s/T in [active[0], active[1]) and the video longer than one frame, m = (motion(p_s) / norm)^exponent, where
motion(p) = ‖p[S:] − p[:−S]‖₁ / (‖p[S:]‖₁ + ‖p[:−S]‖₁) over S tokens per frame, mg = gradient_scale·(m − m_prev)/(s − c)
(m_prev = m at the first such step) and d ← d·(m + |mg|). The counter becomes the reuse_steps of the first codebook
entry with d ≤ threshold.

**bwcache** `{threshold, reuse_steps, indicator_blocks, protect_first, protect_last, half_remaining}` (plans fitted
before the paper's end rule carry `refresh_every` instead of `half_remaining`). D = mean over indicator_blocks of
‖h_s − h_c‖₁ / ‖h_c‖₁ on the blocks' outputs h; d ≤ threshold sets the counter to reuse_steps, else to 0. With
`half_remaining` (the paper's end protection) a trigger at step s reuses at most ⌊(T − 1 − s) / 2⌋ steps: only the
first half of the steps remaining after it, so the last step always computes.

Cases the rules above leave open, decided once for the replay and the simulation alike:

- *No codebook entry matches* (d above every threshold, or not a number): the counter becomes 0, the next step
  computes. A distance beyond everything calibrated is evidence of fast change, where reusing (as the last entry's
  count would) is least safe. The planner's codebooks end with a catch-all entry whose count is 0, so on fitted
  plans either reading gives the same schedules, and fitted plans do not depend on the choice.
- *MoReg's `active` window missing from a plan*: `MOREG_ACTIVE`, the paper's (0.1, 0.9), which the planner
  calibrates with and always writes, so only hand-written plans rely on the default; failing instead would reject
  plans that are otherwise complete for the sake of a field with one customary value.
- *`refresh_every` below 1*: read as 1 (every unprotected step refreshes) rather than failing on a modulo by zero.
- *A computed step without a measurement* (the first one of a generation, or a probe the replay did not observe):
  no new decision, the counter keeps its value. The planner has a measurement at every computed step but the first.

**Replay.** One decision per step, shared by the CFG branches. The first branch to call the transformer at step 0
of a generation (the "decider", `cond` in diffusers' pipelines) measures its probe tensors on computed steps and
decides; every other branch follows the same decision at that step. Under `torch.distributed`, the measured sums are
all-reduced before deciding, so every rank takes the same path. A decision needs one host read per computed step
(the distance); reuse steps read nothing.

Example plan policy:
    {"kind": "adacache", "probe_block": 4, "codebook": [[0.05, 3], [0.1, 2], [1e9, 0]],
     "moreg": {"enabled": true, "norm": 0.385, "exponent": 8, "gradient_scale": 10, "active": [0.1, 0.9]},
     "protect_first": 2, "protect_last": 2}
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import PlanError

_EPS = 1e-12
MOREG_ACTIVE = (0.1, 0.9)  # MoReg's window, as fractions of the steps (the paper's); plans may omit it


def _expect_keys(policy: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in policy]
    if missing:
        raise PlanError(f"plan policy '{policy['kind']}' is missing {', '.join(missing)}")


class StepDecisions:
    """Which steps of one generation reuse, from protection, refresh steps and the reuse counter (no tensors).

    Ask `reuses(step, steps)` once per step, in order; after every step it answers False to, call `computed` with
    what that step measured, which sets the counter for the steps that follow.
    """

    def __init__(self, protect_first: int, protect_last: int) -> None:
        self.protect_first = int(protect_first)
        self.protect_last = int(protect_last)
        self.reset()

    def reset(self) -> None:
        """Start a new generation."""
        self.counter = 0
        self.last_computed: int | None = None

    def reuses(self, step: int, steps: int) -> bool:
        """Whether `step` of `steps` reuses (spending one step of the counter if so)."""
        protected = step < self.protect_first or step >= steps - self.protect_last
        if protected or self._refreshes(step) or self.counter <= 0:
            return False
        self.counter -= 1
        return True

    def computed(self, step: int, steps: int, distance: float | None, motion: float | None = None) -> None:
        """Record that `step` was computed and decide how many steps reuse next.

        `distance` is D between this step and the last computed one, not yet divided by the steps elapsed (None: no
        measurement, no new decision); `motion` is the probe's frame-to-frame motion at this step, which only
        AdaCache's MoReg reads (None for a single frame).
        """
        last = self.last_computed
        if last is not None and distance is not None:
            self.counter = self._reuse_count(distance / (step - last), motion, step, step - last, steps)
        self.last_computed = step

    def _refreshes(self, step: int) -> bool:
        return False

    def _reuse_count(self, distance: float, motion: float | None, step: int, elapsed: int, steps: int) -> int:
        raise NotImplementedError


class AdaCacheDecisions(StepDecisions):
    """AdaCache (+MoReg): distance per step, scaled by motion, looked up in the codebook."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.codebook = [(float(t), int(n)) for t, n in policy["codebook"]]
        moreg = policy["moreg"]
        self.moreg = bool(moreg.get("enabled"))
        self.active = tuple(float(f) for f in moreg.get("active", MOREG_ACTIVE))
        if self.moreg:
            missing = [k for k in ("norm", "exponent", "gradient_scale") if k not in moreg]
            if missing:
                raise PlanError(f"adacache moreg is enabled but missing {', '.join(missing)}")
            self.norm, self.exponent = float(moreg["norm"]), float(moreg["exponent"])
            self.gradient_scale = float(moreg["gradient_scale"])
        super().__init__(policy["protect_first"], policy["protect_last"])

    def reset(self) -> None:
        super().reset()
        self.motion_previous: float | None = None

    def _reuse_count(self, distance: float, motion: float | None, step: int, elapsed: int, steps: int) -> int:
        low, high = self.active
        if self.moreg and motion is not None and low <= step / steps < high:
            regularised = (motion / self.norm) ** self.exponent
            previous = regularised if self.motion_previous is None else self.motion_previous
            gradient = self.gradient_scale * (regularised - previous) / elapsed
            self.motion_previous = regularised
            distance *= regularised + abs(gradient)
        return next((n for threshold, n in self.codebook if distance <= threshold), 0)


class BWCacheDecisions(StepDecisions):
    """BWCache: indicator per step at or below the threshold → reuse a fixed number of steps, at most half of the
    steps remaining (`half_remaining`), or with periodic refreshes (`refresh_every`, older plans)."""

    def __init__(self, policy: dict[str, Any]) -> None:
        self.threshold = float(policy["threshold"])
        self.reuse_length = int(policy["reuse_steps"])
        refresh = policy.get("refresh_every")
        self.refresh_every = None if refresh is None else max(1, int(refresh))
        self.half_remaining = bool(policy.get("half_remaining", False))
        super().__init__(policy["protect_first"], policy["protect_last"])

    def _refreshes(self, step: int) -> bool:
        return self.refresh_every is not None and (step - self.protect_first) % self.refresh_every == 0

    def _reuse_count(self, distance: float, motion: float | None, step: int, elapsed: int, steps: int) -> int:
        if not distance <= self.threshold:
            return 0
        return min(self.reuse_length, (steps - 1 - step) // 2) if self.half_remaining else self.reuse_length


class AdaptivePolicy:
    """Replay hooks of an adaptive policy for one generation: measure on the decider branch, decide, share."""

    kind = ""

    def __init__(self, decisions: StepDecisions, num_blocks: int) -> None:
        self.decisions = decisions
        self.num_blocks = num_blocks
        self.last_generation: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Start a new generation (keeping the finished one's reuse steps in `last_generation`)."""
        if getattr(self, "decider", None) is not None:
            self.last_generation = sorted(self.reuse_steps)
        self.decisions.reset()
        self.decider: str | None = None
        self.reuse_steps: set[int] = set()
        self.sums: list[torch.Tensor] = []

    def observed_blocks(self) -> set[int]:
        raise NotImplementedError

    def reused_steps(self) -> list[int]:
        """Steps reused in the generation under way, or else in the last finished one."""
        return sorted(self.reuse_steps) if self.decider is not None else self.last_generation

    def begin_step(self, branch: str, step: int, steps: int) -> bool:
        """Whether the whole stack reuses at `step` (decided once per step by the decider branch)."""
        if step == 0 and self.decider is not None and branch == self.decider:
            self.reset()
        if self.decider is None:
            self.decider = branch
        if branch == self.decider:
            if self.decisions.reuses(step, steps):
                self.reuse_steps.add(step)
            self.sums = []
        return step in self.reuse_steps

    def observe(
        self,
        branch: str,
        block: int,
        hidden_in: torch.Tensor,
        hidden_out: torch.Tensor,
        step: int,
        tokens_per_frame: int,
    ) -> None:
        raise NotImplementedError

    def end_step(self, branch: str, step: int, steps: int) -> None:
        """After the decider computed `step`: reduce the observed sums to numbers and let the decisions take them."""
        if branch != self.decider or step in self.reuse_steps:
            return
        distance, motion = None, None
        if self.sums:
            distance, motion = self._measured(_all_reduce(torch.stack(self.sums)).double().cpu().tolist())
        self.decisions.computed(step, steps, distance, motion)
        self._remember(step)

    def _measured(self, values: list[float]) -> tuple[float, float | None]:
        """(distance, motion) that `StepDecisions.computed` takes, from the all-reduced sums."""
        raise NotImplementedError

    def _remember(self, step: int) -> None:
        """Keep what the next measurement compares against (set by `observe` on the decider's computed steps)."""


class AdaCachePolicy(AdaptivePolicy):
    """Distance of the probe block's residual between computed steps → codebook → number of steps to reuse."""

    kind = "adacache"

    def __init__(self, policy: dict[str, Any], num_blocks: int) -> None:
        _expect_keys(policy, ("probe_block", "codebook", "moreg", "protect_first", "protect_last"))
        self.probe = int(policy["probe_block"])
        if not 0 <= self.probe < num_blocks:
            raise PlanError(f"adacache probe_block {self.probe} is outside the {num_blocks} blocks")
        super().__init__(AdaCacheDecisions(policy), num_blocks)

    def reset(self) -> None:
        super().reset()
        self.previous: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def observed_blocks(self) -> set[int]:
        return {self.probe}

    def observe(self, branch, block, hidden_in, hidden_out, step, tokens_per_frame) -> None:
        if branch != self.decider or block != self.probe:
            return
        residual = (hidden_out - hidden_in).detach()
        self.pending = residual
        if self.previous is not None:
            self.sums = [
                (residual.float() - self.previous.float()).abs().sum(),
                self.previous.float().abs().sum(),
                *_motion_sums(residual, tokens_per_frame),
            ]

    def _measured(self, values: list[float]) -> tuple[float, float | None]:
        motion = values[2] / max(values[3], _EPS) if len(values) == 4 else None
        return values[0] / max(values[1], _EPS), motion

    def _remember(self, step: int) -> None:
        self.previous, self.pending = self.pending, None


class BWCachePolicy(AdaptivePolicy):
    """Mean relative L1 of indicator blocks' outputs between computed steps below a threshold → reuse R steps."""

    kind = "bwcache"

    def __init__(self, policy: dict[str, Any], num_blocks: int) -> None:
        _expect_keys(policy, ("threshold", "reuse_steps", "indicator_blocks", "protect_first", "protect_last"))
        self.indicators = [int(b) for b in policy["indicator_blocks"]]
        if not self.indicators or not all(0 <= b < num_blocks for b in self.indicators):
            raise PlanError(f"bwcache indicator_blocks must name blocks among the {num_blocks}")
        super().__init__(BWCacheDecisions(policy), num_blocks)

    def reset(self) -> None:
        super().reset()
        self.previous: dict[int, torch.Tensor] = {}
        self.pending: dict[int, torch.Tensor] = {}

    def observed_blocks(self) -> set[int]:
        return set(self.indicators)

    def observe(self, branch, block, hidden_in, hidden_out, step, tokens_per_frame) -> None:
        if branch != self.decider or block not in self.indicators:
            return
        self.pending[block] = hidden_out.detach()
        previous = self.previous.get(block)
        if previous is not None:
            self.sums += [(hidden_out.float() - previous.float()).abs().sum(), previous.float().abs().sum()]

    def _measured(self, values: list[float]) -> tuple[float, float | None]:
        ratios = [values[i] / max(values[i + 1], _EPS) for i in range(0, len(values), 2)]
        return sum(ratios) / len(ratios), None

    def _remember(self, step: int) -> None:
        self.previous, self.pending = self.pending, {}


def _motion_sums(residual: torch.Tensor, tokens_per_frame: int) -> list[torch.Tensor]:
    """(‖p[:, S:] − p[:, :−S]‖₁, ‖p[:, S:]‖₁ + ‖p[:, :−S]‖₁) of a (batch, tokens, dim) residual; none if one frame."""
    if residual.dim() != 3 or residual.shape[1] <= tokens_per_frame:
        return []
    later, earlier = residual[:, tokens_per_frame:].float(), residual[:, :-tokens_per_frame].float()
    return [(later - earlier).abs().sum(), later.abs().sum() + earlier.abs().sum()]


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum `values` over ranks when torch.distributed is initialised, so every rank decides alike."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


POLICIES: dict[str, type[AdaptivePolicy]] = {"adacache": AdaCachePolicy, "bwcache": BWCachePolicy}
