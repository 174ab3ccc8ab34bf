"""The planner's model of a schedule: what it costs in FLOPs and how much error it is predicted to add.

**Cost.** One transformer call costs `other_flops` (embeddings, output head: model FLOPs minus block FLOPs) plus, per
block, its full FLOPs when computed, its reduced FLOPs when pruned (PCA-sliced attention scores) and nothing when
reused. Predicted speedup = full cost of all steps / planned cost (CFG branches scale both alike).

**Error.** Let `drift[b, s]` be how much block b's residual changes from step s-1 to s, as a fraction of the block
stack's output norm at s (profiled relative L1 drift × residual norm / output norm, averaged over prompts and
branches). A block's cache holds the residual of its last non-reuse step. Reusing it at step s is off by the cache's
own error plus the drift accumulated since it was written (triangle inequality): `cached[b, s] = cache_error +
Σ drift[b, k]` over the steps since. A computed step has error 0 and writes an exact cache. A pruned step blends a
pruned computation (error `prune[b, s]`) with the cache (error `cached`); for independent errors the inverse-variance
weight `w = cached² / (prune² + cached²)` (the DWS weight) gives error `prune·cached / √(prune² + cached²)`, never
worse than either, and the blended residual becomes the cache. A velocity error at step s moves the final latent by
`|σ_s − σ_{s+1}|` times itself (flow-matching Euler step), so the predicted error of a plan is

    E = Σ_s |σ_s − σ_{s+1}| · Σ_b cell_error[b, s]

a relative error of the final latent. Fidelity follows it as PSNR ≈ C − 20·log10(E) with a model-specific constant C
that `dit-plan validate` measures. Every input of this model is stored in the plan (`error.*`, `cost.*` arrays), so
a plan can be re-scored and tightened without its profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dit_accel.runtime.plan import PRUNE, REUSE, Plan

from .errors import PlannerError

ARRAY_NAMES = (
    "error.drift",
    "error.prune",
    "error.step_weight",
    "error.block_weight",
    "cost.block_flops",
    "cost.pruned_flops",
    "cost.other_flops",
)


@dataclass(frozen=True)
class Predictor:
    """Cost and error model of one model's schedules (arrays are [blocks, steps], [steps] or [blocks])."""

    drift: np.ndarray
    prune_error: np.ndarray
    step_weight: np.ndarray
    block_weight: np.ndarray
    block_flops: np.ndarray
    pruned_flops: np.ndarray
    other_flops: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.drift.shape

    @property
    def can_prune(self) -> bool:
        return bool(np.any(self.pruned_flops < self.block_flops))

    def cell_errors(self, actions: np.ndarray) -> np.ndarray:
        """Predicted error of every cell of `actions` (blocks × steps), before step weighting."""
        return cache_errors(actions, self.drift, self.prune_error)[0]

    def unit_costs(self, blocks: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(error, block-weighted error, FLOPs) of each candidate row (n × steps) applied to every block of `blocks`."""
        schedules = np.broadcast_to(rows[:, None, :], (rows.shape[0], len(blocks), rows.shape[1]))
        errors = cache_errors(schedules, self.drift[blocks], self.prune_error[blocks])[0] @ self.step_weight
        flops = np.take_along_axis(self._flop_table(blocks)[None], schedules.astype(np.int64), axis=-1).sum(axis=(1, 2))
        return errors.sum(axis=1), errors @ self.block_weight[blocks], flops

    def _flop_table(self, blocks: np.ndarray | slice = slice(None)) -> np.ndarray:
        """FLOPs of each block (rows) per action code (columns: compute, reuse, prune)."""
        return np.stack(
            [self.block_flops[blocks], np.zeros_like(self.block_flops[blocks]), self.pruned_flops[blocks]], axis=-1
        )

    def error(self, actions: np.ndarray) -> float:
        """Predicted relative error of the final latent under `actions` (blocks × steps)."""
        return float((self.cell_errors(actions) @ self.step_weight).sum())

    def total_flops(self, actions: np.ndarray) -> float:
        """FLOPs of one generation (one CFG branch) under `actions`."""
        calls = np.take_along_axis(self._flop_table(), actions.astype(np.int64), axis=-1).sum()
        return float(calls + self.other_flops * actions.shape[1])

    def full_flops(self) -> float:
        return float((self.block_flops.sum() + self.other_flops) * self.drift.shape[1])

    def speedup(self, actions: np.ndarray) -> float:
        """FLOP-predicted speedup of `actions` over computing everything."""
        return self.full_flops() / self.total_flops(actions)

    def dws_weights(self, actions: np.ndarray) -> np.ndarray:
        """Blend weight of the pruned output on every cell (1 where nothing is blended), float32 [blocks, steps]."""
        cached = cache_errors(actions, self.drift, self.prune_error)[1]
        return np.where(actions == PRUNE, blend_weight(self.prune_error, cached), 1.0).astype(np.float32)

    def summary(self, actions: np.ndarray) -> dict[str, float]:
        """The `predicted` entry of a static plan."""
        return {
            "speedup": self.speedup(actions),
            "compute_fraction": float(np.mean(actions != REUSE)),
            "error": self.error(actions),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The model as named plan arrays (see `ARRAY_NAMES`)."""
        return {
            "error.drift": self.drift.astype(np.float32),
            "error.prune": self.prune_error.astype(np.float32),
            "error.step_weight": self.step_weight.astype(np.float32),
            "error.block_weight": self.block_weight.astype(np.float32),
            "cost.block_flops": self.block_flops.astype(np.float64),
            "cost.pruned_flops": self.pruned_flops.astype(np.float64),
            "cost.other_flops": np.array([self.other_flops], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Predictor:
        """Rebuild the model from plan arrays; float32 values round-trip exactly, so predictions repeat."""
        return cls(
            drift=arrays["error.drift"].astype(np.float64),
            prune_error=arrays["error.prune"].astype(np.float64),
            step_weight=arrays["error.step_weight"].astype(np.float64),
            block_weight=arrays["error.block_weight"].astype(np.float64),
            block_flops=arrays["cost.block_flops"].astype(np.float64),
            pruned_flops=arrays["cost.pruned_flops"].astype(np.float64),
            other_flops=float(arrays["cost.other_flops"][0]),
        )

    def rounded(self) -> Predictor:
        """The same model with its float arrays rounded through float32, as a plan stores them."""
        return Predictor.from_arrays(self.to_arrays())


def predictor_from_plan(plan: Plan) -> Predictor:
    """The error and cost model a fitted plan carries; refuses plans that were not made by dit-plan fit."""
    missing = [name for name in ARRAY_NAMES if name not in plan.arrays]
    if missing:
        raise PlannerError(
            f"the plan carries no error model (missing arrays {', '.join(missing)}); make it with dit-plan fit"
        )
    predictor = Predictor.from_arrays(plan.arrays)
    if predictor.shape != plan.actions.shape:
        raise PlannerError(f"the plan's error model has shape {predictor.shape}, its actions {plan.actions.shape}")
    return predictor


def cache_errors(actions: np.ndarray, drift: np.ndarray, prune: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(error of each cell, error of the cache each cell would reuse) for schedules [..., steps].

    Steps through the schedule once: drift accumulates on the cache since it was written; a computed step writes an
    exact cache, a pruned step writes its blended result, a reused step leaves the cache as it is.
    """
    drift = np.broadcast_to(drift, actions.shape)
    prune = np.broadcast_to(prune, actions.shape)
    cells, cached = np.zeros(actions.shape), np.zeros(actions.shape)
    cache, stale = np.zeros(actions.shape[:-1]), np.zeros(actions.shape[:-1])
    for step in range(actions.shape[-1]):
        action = actions[..., step]
        stale = stale + drift[..., step]
        cached[..., step] = current = cache + stale
        cell = np.where(
            action == REUSE, current, np.where(action == PRUNE, blended_error(prune[..., step], current), 0.0)
        )
        cells[..., step] = cell
        refresh = action != REUSE
        cache, stale = np.where(refresh, cell, cache), np.where(refresh, 0.0, stale)
    return cells, cached


def blended_error(prune: np.ndarray, stale: np.ndarray) -> np.ndarray:
    """Error of the inverse-variance blend of a pruned output (error `prune`) and a cached one (error `stale`)."""
    norm = np.hypot(prune, stale)
    return np.divide(prune * stale, norm, out=np.zeros(np.broadcast(prune, stale).shape), where=norm > 0)


def blend_weight(prune: np.ndarray, stale: np.ndarray) -> np.ndarray:
    """DWS weight of the pruned output: stale² / (prune² + stale²); 1 (pure pruned) when both errors are 0."""
    total = prune**2 + stale**2
    return np.divide(stale**2, total, out=np.ones(np.broadcast(prune, stale).shape), where=total > 0)


def step_weights(sigmas: np.ndarray) -> np.ndarray:
    """|σ_s − σ_{s+1}| with σ_T = 0: how much a velocity error at step s moves the final latent (uniform fallback)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    weights = np.abs(np.diff(np.append(sigmas, 0.0)))
    if not np.all(np.isfinite(weights)) or weights.sum() <= 0:
        return np.full(sigmas.shape, 1.0 / max(len(sigmas), 1))
    return weights
