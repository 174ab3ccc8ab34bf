"""Adaptive policies replayed from a plan's calibrated parameters: AdaCache (+MoReg) and BWCache.

Both decide online which steps reuse the whole stack's cached residual. The rules are the planner's (see
`planner/policies.py`), with one runtime choice: **one decision per step, shared by the CFG branches.** The first
branch to call the transformer at step 0 of a generation (the "decider", `cond` in diffusers' pipelines) measures
its probe tensors on computed steps and decides; every other branch follows the same decision at that step. Under
`torch.distributed`, the measured sums are all-reduced before deciding, so every rank takes the same path.

A decision needs one host read per computed step (the distance); reuse steps read nothing.

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


def _expect_keys(policy: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in policy]
    if missing:
        raise PlanError(f"plan policy '{policy['kind']}' is missing {', '.join(missing)}")


class AdaptivePolicy:
    """Shared decision state of an adaptive policy for one generation."""

    kind = ""

    def __init__(self, policy: dict[str, Any], num_blocks: int) -> None:
        self.policy = policy
        self.protect_first = int(policy["protect_first"])
        self.protect_last = int(policy["protect_last"])
        self.num_blocks = num_blocks
        self.last_generation: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Start a new generation (keeping the finished one's reuse steps in `last_generation`)."""
        if getattr(self, "decider", None) is not None:
            self.last_generation = sorted(self.reuse_steps)
        self.decider: str | None = None
        self.counter = 0
        self.reuse_steps: set[int] = set()
        self.last_computed: int | None = None
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
            protected = step < self.protect_first or step >= steps - self.protect_last
            reuse = not protected and self._wants_reuse(step)
            if reuse:
                self.reuse_steps.add(step)
            self.sums = []
        return step in self.reuse_steps

    def _wants_reuse(self, step: int) -> bool:
        if self.counter > 0:
            self.counter -= 1
            return True
        return False

    def observe(self, branch: str, block: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor, step: int, tokens_per_frame: int) -> None:
        raise NotImplementedError

    def end_step(self, branch: str, step: int, steps: int) -> None:
        """After the decider computed `step`: turn the observed sums into the next decision."""
        if branch != self.decider or step in self.reuse_steps:
            return
        if self.last_computed is not None and self.sums:
            values = _all_reduce(torch.stack(self.sums)).double().cpu().tolist()
            self.counter = self._decide(values, step, step - self.last_computed, steps)
        self._remember(step)
        self.last_computed = step

    def _decide(self, values: list[float], step: int, elapsed: int, steps: int) -> int:
        raise NotImplementedError

    def _remember(self, step: int) -> None:
        """Keep what the next decision compares against (set by `observe` on the decider's computed steps)."""


class AdaCachePolicy(AdaptivePolicy):
    """Distance of the probe block's residual between computed steps → codebook → number of steps to reuse."""

    kind = "adacache"

    def __init__(self, policy: dict[str, Any], num_blocks: int) -> None:
        _expect_keys(policy, ("probe_block", "codebook", "moreg", "protect_first", "protect_last"))
        self.probe = int(policy["probe_block"])
        if not 0 <= self.probe < num_blocks:
            raise PlanError(f"adacache probe_block {self.probe} is outside the {num_blocks} blocks")
        self.codebook = [(float(t), int(n)) for t, n in policy["codebook"]]
        self.moreg = dict(policy["moreg"])
        super().__init__(policy, num_blocks)

    def reset(self) -> None:
        super().reset()
        self.previous: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.motion_previous: float | None = None

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
                residual.float().abs().sum(),
                *_motion_sums(residual, tokens_per_frame),
            ]

    def _remember(self, step: int) -> None:
        self.previous, self.pending = self.pending, None

    def _decide(self, values, step, elapsed, steps) -> int:
        distance = values[0] / max(values[1], _EPS) / elapsed
        low, high = self.moreg.get("active", (0.1, 0.9))
        if self.moreg.get("enabled") and low <= step / steps < high and len(values) == 4:
            motion = (values[2] / max(values[3], _EPS) / float(self.moreg["norm"])) ** float(self.moreg["exponent"])
            previous = motion if self.motion_previous is None else self.motion_previous
            gradient = float(self.moreg["gradient_scale"]) * (motion - previous) / elapsed
            self.motion_previous = motion
            distance *= motion + abs(gradient)
        return next((n for threshold, n in self.codebook if distance <= threshold), 0)


class BWCachePolicy(AdaptivePolicy):
    """Mean relative L1 of indicator blocks' outputs between computed steps below a threshold → reuse R steps."""

    kind = "bwcache"

    def __init__(self, policy: dict[str, Any], num_blocks: int) -> None:
        _expect_keys(policy, ("threshold", "reuse_steps", "indicator_blocks", "protect_first", "protect_last", "refresh_every"))
        self.threshold = float(policy["threshold"])
        self.reuse_length = int(policy["reuse_steps"])
        self.refresh_every = max(1, int(policy["refresh_every"]))
        self.indicators = [int(b) for b in policy["indicator_blocks"]]
        if not self.indicators or not all(0 <= b < num_blocks for b in self.indicators):
            raise PlanError(f"bwcache indicator_blocks must name blocks among the {num_blocks}")
        super().__init__(policy, num_blocks)

    def reset(self) -> None:
        super().reset()
        self.previous: dict[int, torch.Tensor] = {}
        self.pending: dict[int, torch.Tensor] = {}

    def observed_blocks(self) -> set[int]:
        return set(self.indicators)

    def _wants_reuse(self, step: int) -> bool:
        if (step - self.protect_first) % self.refresh_every == 0:
            return False
        return super()._wants_reuse(step)

    def observe(self, branch, block, hidden_in, hidden_out, step, tokens_per_frame) -> None:
        if branch != self.decider or block not in self.indicators:
            return
        self.pending[block] = hidden_out.detach()
        previous = self.previous.get(block)
        if previous is not None:
            self.sums += [(hidden_out.float() - previous.float()).abs().sum(), previous.float().abs().sum()]

    def _remember(self, step: int) -> None:
        self.previous, self.pending = self.pending, {}

    def _decide(self, values, step, elapsed, steps) -> int:
        ratios = [values[i] / max(values[i + 1], _EPS) for i in range(0, len(values), 2)]
        indicator = sum(ratios) / len(ratios) / elapsed
        return self.reuse_length if indicator <= self.threshold else 0


def _motion_sums(residual: torch.Tensor, tokens_per_frame: int) -> list[torch.Tensor]:
    """(‖p[:, S:] − p[:, :−S]‖₁, ‖p[:, S:]‖₁ + ‖p[:, :−S]‖₁) of a (batch, tokens, dim) residual; none if it has one frame."""
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
