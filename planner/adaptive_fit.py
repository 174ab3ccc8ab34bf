"""Adaptive policies calibrated offline: AdaCache (+MoReg) and BWCache, and their replay simulated on the profile.

Both decide online which steps reuse every block's cached residual, once per step for all CFG branches (measured on
the first branch to run, cond); the planner fixes their parameters from the profiled distributions and predicts
their speedup and error by replaying them on every profiled prompt's cond branch. The rules, and the policy fields,
are those of `dit_accel.runtime.adaptive`: the simulation drives the runtime's own decision code
(`AdaCacheDecisions`, `BWCacheDecisions`), so the two cannot disagree. What the simulation supplies is the measured
numbers: a distance over k steps is approximated by the sum of the k adjacent-step drifts the profile holds (so the
distance per step is their mean, an upper bound by the triangle inequality), and MoReg's motion is the profiled
motion at the computed step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dit_accel.runtime.adaptive import MOREG_ACTIVE, AdaCacheDecisions, BWCacheDecisions, StepDecisions

from .predict import Predictor

CODEBOOK_SIZE = 6
MOREG_EXPONENT, MOREG_GRADIENT_SCALE, MOREG_PAPER_NORM = 8.0, 10.0, 0.385


@dataclass(frozen=True)
class Simulation:
    """Replays of a policy on every profiled prompt: reuse [n, steps] and the predicted outcome."""

    reuse: np.ndarray
    speedup: float
    error: float

    def expected_compute(self, blocks: int) -> np.ndarray:
        """Share of profiled replays that compute each block at each step, float32 [blocks, steps]."""
        return np.broadcast_to(1.0 - self.reuse.mean(axis=0), (blocks, self.reuse.shape[1])).astype(np.float32)

    def predicted(self) -> dict[str, float]:
        """The plan's prediction: mean speedup and error, and the step speedup of the slowest and fastest replay
        (adaptive policies decide per prompt; MoReg makes faster-moving videos compute more)."""
        per_run = self.reuse.shape[1] / np.maximum(self.reuse.shape[1] - self.reuse.sum(axis=1), 1)
        return {
            "speedup": self.speedup,
            "step_speedup_range": [float(per_run.min()), float(per_run.max())],
            "compute_fraction": float(1.0 - self.reuse.mean()),
            "error": self.error,
            "simulated_runs": int(self.reuse.shape[0]),
        }


def simulate(reuse: np.ndarray, predictor: Predictor) -> Simulation:
    """Predicted speedup (mean FLOPs over replays) and error (mean over replays) of whole-stack reuse schedules."""
    blocks = predictor.shape[0]
    schedules = [np.broadcast_to(row.astype(np.uint8), (blocks, row.shape[0])) for row in reuse]
    flops = np.mean([predictor.total_flops(s) for s in schedules])
    error = float(np.mean([predictor.error(s) for s in schedules]))
    return Simulation(reuse, predictor.full_flops() / flops, error)


def unprotected(steps: int, protect_first: int, protect_last: int) -> np.ndarray:
    """Boolean [steps]: steps where an adaptive policy may reuse (and step 0, which has no drift, excluded)."""
    mask = np.zeros(steps, dtype=bool)
    mask[max(protect_first, 1) : max(steps - protect_last, 0)] = True
    return mask


def choose_probe_block(rel_l1: np.ndarray, stack_drift: np.ndarray, steps: np.ndarray) -> int:
    """The block whose residual drift [n, step, block] tracks the whole stack's drift [n, step] best (Pearson r).

    AdaCache probes a mid-depth block; calibrating picks the block whose distance best predicts the error of reusing
    the whole stack. Mid-depth when no block correlates (e.g. constant drift).
    """
    target = stack_drift[:, steps].ravel()
    scores = np.array([_correlation(rel_l1[:, steps, b].ravel(), target) for b in range(rel_l1.shape[-1])])
    return int(np.argmax(scores)) if scores.max() > -np.inf else rel_l1.shape[-1] // 2


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return -np.inf
    return float(np.corrcoef(a, b)[0, 1])


def moreg_settings(motion: np.ndarray | None, steps: np.ndarray) -> dict[str, Any]:
    """MoReg parameters: the paper's exponent, gradient scale and active range; `norm` = median profiled motion.

    The paper's norm (0.385) makes (m / norm)^8 ≈ 1 for typical motion in its models; the median of this model's
    motion at the probe over the active steps plays the same role here (paper value when no motion is positive).
    """
    settings = {
        "enabled": motion is not None,
        "norm": MOREG_PAPER_NORM,
        "exponent": MOREG_EXPONENT,
        "gradient_scale": MOREG_GRADIENT_SCALE,
        "active": list(MOREG_ACTIVE),
    }
    if motion is None:
        return settings
    values = motion[:, steps & _active_steps(motion.shape[1], MOREG_ACTIVE)]
    median = float(np.median(values)) if values.size else 0.0
    return {**settings, "norm": median} if np.isfinite(median) and median > 0 else settings


def _active_steps(steps: int, active: tuple[float, float] | list[float]) -> np.ndarray:
    fraction = np.arange(steps) / steps
    return (fraction >= active[0]) & (fraction < active[1])


def adjacent_distances(
    probe_drift: np.ndarray, motion: np.ndarray | None, moreg: dict[str, Any], steps: np.ndarray
) -> np.ndarray:
    """The distances AdaCache would measure one step apart, MoReg applied, over all prompts and reusable steps."""
    distances = probe_drift.copy()
    if moreg["enabled"]:
        m = (motion / moreg["norm"]) ** moreg["exponent"]
        gradient = np.zeros_like(m)
        gradient[:, 1:] = moreg["gradient_scale"] * np.diff(m, axis=1)
        factor = np.where(_active_steps(m.shape[1], moreg["active"]), m + np.abs(gradient), 1.0)
        distances = distances * factor
    return distances[:, steps].ravel()


def adacache_policy(
    distances: np.ndarray,
    scale: float,
    steps: int,
    probe: int,
    moreg: dict[str, Any],
    protect_first: int,
    protect_last: int,
) -> dict[str, Any]:
    """AdaCache policy whose codebook thresholds are `scale` × quantiles (1/6 … 5/6) of the profiled distances.

    Reuse lengths fall evenly from round(T/6) (lowest distances) to 0; the last threshold is large, catching all.
    """
    levels = np.arange(1, CODEBOOK_SIZE) / CODEBOOK_SIZE
    thresholds = [float(scale * q) for q in np.quantile(distances, levels)]
    thresholds.append(float(max(1.0, 10.0 * scale * float(distances.max()))))
    longest = max(1, round(steps / 6))
    reuse = [int(round(r)) for r in np.linspace(longest, 0, CODEBOOK_SIZE)]
    return {
        "kind": "adacache",
        "probe_block": int(probe),
        "codebook": [[t, r] for t, r in zip(thresholds, reuse)],
        "moreg": moreg,
        "protect_first": int(protect_first),
        "protect_last": int(protect_last),
    }


def simulate_adacache(policy: dict[str, Any], probe_drift: np.ndarray, motion: np.ndarray | None) -> np.ndarray:
    """Reuse [n, steps] of the runtime's AdaCache decisions replayed on each profiled probe drift series [n, steps]."""
    return np.stack(
        [
            _replay(AdaCacheDecisions(policy), probe_drift[i], None if motion is None else motion[i])
            for i in range(len(probe_drift))
        ]
    )


def bwcache_policy(
    indicator: np.ndarray,
    quantile: float,
    indicator_blocks: list[int],
    reuse_steps: int,
    protect_first: int,
    protect_last: int,
) -> dict[str, Any]:
    """BWCache policy whose threshold is the `quantile` of the profiled indicator distribution, with the paper's end
    protection (a trigger reuses at most half of the steps remaining after it)."""
    return {
        "kind": "bwcache",
        "threshold": float(np.quantile(indicator, quantile)),
        "reuse_steps": int(reuse_steps),
        "indicator_blocks": [int(b) for b in indicator_blocks],
        "protect_first": int(protect_first),
        "protect_last": int(protect_last),
        "half_remaining": True,
    }


def indicator_blocks(blocks: int) -> list[int]:
    """A quarter of the blocks (at least one), one at the centre of each equal slice: BWCache's subset for 3-D
    attention."""
    count = max(1, -(-blocks // 4))
    return [int((i + 0.5) * blocks / count) for i in range(count)]


def simulate_bwcache(policy: dict[str, Any], indicator: np.ndarray) -> np.ndarray:
    """Reuse [n, steps] of the runtime's BWCache decisions replayed on each profiled indicator series [n, steps]."""
    return np.stack([_replay(BWCacheDecisions(policy), series, None) for series in indicator])


def _replay(decisions: StepDecisions, drift: np.ndarray, motion: np.ndarray | None) -> np.ndarray:
    """Reuse [steps] taken by `decisions` when a computed step measures the summed `drift` since the last one."""
    steps = len(drift)
    reuse = np.zeros(steps, dtype=bool)
    for step in range(steps):
        reuse[step] = decisions.reuses(step, steps)
        if not reuse[step]:
            last = decisions.last_computed
            distance = None if last is None else float(drift[last + 1 : step + 1].sum())
            decisions.computed(step, steps, distance, None if motion is None else float(motion[step]))
    return reuse
