"""The planner's simulation of AdaCache/BWCache takes the same decisions as the runtime's replay hooks.

Each case draws a profile-like series (adjacent-step drift, and motion for MoReg), simulates it with the planner,
and replays it through the runtime's hooks (`begin_step` / `observe` / `end_step` for a cond and an uncond branch)
on tensors built so that, at every computed step, the runtime measures what the planner derives from the series:
the summed drift since the last computed step, and that step's motion. The reused steps must be identical.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from dit_accel.planner.adaptive_fit import simulate_adacache, simulate_bwcache
from dit_accel.runtime.adaptive import AdaCachePolicy, AdaptivePolicy, BWCachePolicy

STEPS, BLOCKS = 20, 3
POSITIONS = 2 * STEPS + 2
MOREG = {"enabled": True, "norm": 0.385, "exponent": 8.0, "gradient_scale": 10.0, "active": [0.1, 0.9]}
ADACACHE = {
    "kind": "adacache",
    "probe_block": 1,
    "codebook": [[0.02, 3], [0.035, 2], [0.05, 1]],
    "moreg": MOREG,
    "protect_first": 2,
    "protect_last": 2,
}
BWCACHE = {
    "kind": "bwcache",
    "reuse_steps": 3,
    "indicator_blocks": [0, 2],
    "protect_first": 2,
    "protect_last": 2,
    "refresh_every": 5,
}

Observed = dict[int, tuple[torch.Tensor, torch.Tensor]]


def drift_series(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Adjacent-step drift [STEPS] (0 at step 0, as the planner reads profiles) and a slowly varying motion [STEPS].

    Motion moves by at most a tenth of each step's drift, so one residual can show both the drift and the motion
    (`ProbeResiduals` checks this).
    """
    rng = np.random.default_rng(seed)
    drift = rng.uniform(0.005, 0.08, STEPS)
    drift[0] = 0.0
    motion = 0.385 + np.cumsum(rng.uniform(-0.1, 0.1, STEPS) * drift)
    return drift, motion


class ProbeResiduals:
    """Two-frame probe residuals whose distance to the last one and motion are chosen, step by step.

    Each step adds mass on fresh token positions only, so ‖p_s − p_c‖₁ is exactly the added mass Q, and the
    distance Q / ‖p_c‖₁ (normalised by the cached residual, as AdaCache's code does); mass written to both frames
    adds no motion, mass written to the second frame only adds its full amount to the frame difference.
    """

    def __init__(self, motion: float) -> None:
        self.frames = np.zeros((2, POSITIONS))
        self.frames[:, 0] = (1.0 - motion) / 2
        self.frames[1, 1] = motion
        self.cursor, self.norm, self.moving = 2, 1.0, motion

    def advance(self, distance: float, motion: float) -> None:
        added = distance * self.norm
        norm = self.norm + added
        one_frame = motion * norm - self.moving
        assert 0.0 <= one_frame <= added, "motion changes faster than the residual can"
        self.frames[:, self.cursor] = (added - one_frame) / 2
        self.frames[1, self.cursor + 1] = one_frame
        self.cursor, self.norm, self.moving = self.cursor + 2, norm, motion * norm

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.frames.reshape(-1))[None, :, None]


class IndicatorOutputs:
    """Outputs of one indicator block whose relative L1 to the last one (‖h_s − h_c‖₁ / ‖h_c‖₁) is chosen."""

    def __init__(self) -> None:
        self.values = np.zeros(POSITIONS)
        self.values[0] = 1.0
        self.cursor = 1

    def advance(self, distance: float) -> None:
        self.values[self.cursor] = distance * self.values.sum()
        self.cursor += 1

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.values)[None, :, None]


def replay(
    policy: AdaptivePolicy,
    observed_at: Callable[[int, int | None], Observed],
    tokens_per_frame: int,
) -> list[int]:
    """Reused steps of one generation driven through the runtime hooks, cond then uncond at every step.

    `observed_at(step, last)` gives the observed blocks' (input, output) at a computed step, `last` being the
    previous computed step; the driver tracks it itself, not through the policy.
    """
    last = None
    for step in range(STEPS):
        taken = []
        for branch in ("cond", "uncond"):
            reuse = policy.begin_step(branch, step, STEPS)
            taken.append(reuse)
            if not reuse:
                for block, (hidden_in, hidden_out) in observed_at(step, last).items():
                    policy.observe(branch, block, hidden_in, hidden_out, step, tokens_per_frame)
            policy.end_step(branch, step, STEPS)
        assert taken[0] == taken[1], f"cond and uncond disagree at step {step}"
        if not taken[0]:
            last = step
    return policy.reused_steps()


def adacache_runtime(policy: dict, drift: np.ndarray, motion: np.ndarray) -> list[int]:
    residuals = ProbeResiduals(float(motion[0]))
    made: dict[int, torch.Tensor] = {}

    def observed_at(step: int, last: int | None) -> Observed:
        if step not in made:
            if last is not None:
                residuals.advance(float(drift[last + 1 : step + 1].sum()), float(motion[step]))
            made[step] = residuals.tensor()
        return {policy["probe_block"]: (torch.zeros_like(made[step]), made[step])}

    return replay(AdaCachePolicy(policy, BLOCKS), observed_at, POSITIONS)


def bwcache_runtime(policy: dict, indicator: np.ndarray) -> list[int]:
    """The two indicator blocks drift by ½ and 1½ times the indicator, whose mean the runtime measures."""
    blocks = {block: IndicatorOutputs() for block in policy["indicator_blocks"]}
    weights = dict(zip(policy["indicator_blocks"], (0.5, 1.5), strict=True))
    made: dict[int, Observed] = {}

    def observed_at(step: int, last: int | None) -> Observed:
        if step not in made:
            for block, outputs in blocks.items():
                if last is not None:
                    outputs.advance(weights[block] * float(indicator[last + 1 : step + 1].sum()))
            made[step] = {block: (torch.zeros(1, POSITIONS, 1), o.tensor()) for block, o in blocks.items()}
        return made[step]

    return replay(BWCachePolicy(policy, BLOCKS), observed_at, POSITIONS)


def planned(reuse: np.ndarray) -> list[int]:
    return np.flatnonzero(reuse[0]).tolist()


def assert_informative(reused: list[int]) -> None:
    """The case exercises the rules: some steps reuse, and some unprotected steps compute after a reuse."""
    assert reused, "no step reused: the case tests nothing"
    assert any(s not in reused for s in range(min(reused), STEPS - 2)), "every unprotected step reused"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("moreg", [True, False], ids=["moreg", "no-moreg"])
def test_adacache_planner_and_runtime_reuse_the_same_steps(seed, moreg):
    drift, motion = drift_series(seed)
    policy = {**ADACACHE, "moreg": {**MOREG, "enabled": moreg}}
    runtime = adacache_runtime(policy, drift, motion)
    assert runtime == planned(simulate_adacache(policy, drift[None], motion[None] if moreg else None))
    assert_informative(runtime)


def test_moreg_changes_the_decisions_of_both():
    """Motion reaches the decisions on both sides (else the MoReg cases above would agree vacuously)."""
    drift, motion = drift_series(0)
    on = adacache_runtime(ADACACHE, drift, motion)
    off = adacache_runtime({**ADACACHE, "moreg": {**MOREG, "enabled": False}}, drift, motion)
    assert on != off


def test_unmatched_distance_computes_the_next_step_on_both_sides():
    """A distance above every codebook threshold reuses nothing, not the last entry's count."""
    policy = {**ADACACHE, "codebook": [[0.01, 2], [0.02, 1]], "moreg": {**MOREG, "enabled": False}}
    drift, motion = np.full(STEPS, 0.05), np.full(STEPS, 0.385)
    drift[0] = 0.0
    assert adacache_runtime(policy, drift, motion) == []
    assert planned(simulate_adacache(policy, drift[None], None)) == []


@pytest.mark.parametrize("seed", range(4))
def test_bwcache_planner_and_runtime_reuse_the_same_steps(seed):
    indicator, _ = drift_series(seed)
    policy = {**BWCACHE, "threshold": float(np.quantile(indicator[2:], 0.6))}
    runtime = bwcache_runtime(policy, indicator)
    assert runtime == planned(simulate_bwcache(policy, indicator[None]))
    assert_informative(runtime)
    refreshes = range(policy["protect_first"], STEPS - policy["protect_last"], policy["refresh_every"])
    assert not set(refreshes) & set(runtime), "refresh steps compute"
