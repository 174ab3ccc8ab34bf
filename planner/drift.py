"""From profiled drift to the planner's cost and error model (see `predict.py` for the formulas)."""

from __future__ import annotations

import numpy as np

from .errors import PlannerError
from .predict import Predictor, step_weights
from .profiles import DRIFT_FIELDS, ProfileSet


def normalised_drift(
    rel_l1: np.ndarray, residual_norm: np.ndarray, output_norm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(drift, share) on [..., step, block]: drift[s] = rel_l1[s]·‖r_{s−1}‖ / ‖h_out,s‖ (0 at step 0),
    share = ‖r_s‖ / ‖h_out,s‖.

    `h_out` is the last block's output, so both are fractions of what the block stack hands to the output head.
    """
    stack_norm = output_norm[..., -1:]
    share = residual_norm / stack_norm
    drift = np.zeros_like(share)
    drift[..., 1:, :] = rel_l1[..., 1:, :] * residual_norm[..., :-1, :] / stack_norm[..., 1:, :]
    return drift, share


def mean_drift(profiles: ProfileSet) -> tuple[np.ndarray, np.ndarray]:
    """(drift, share) averaged over prompts and CFG branches, as [blocks, steps]."""
    profiles.require(DRIFT_FIELDS, "planning")
    with np.errstate(divide="ignore", invalid="ignore"):
        drift, share = normalised_drift(*(profiles.stack(name).astype(np.float64) for name in DRIFT_FIELDS))
    for name, table in (("drift", drift[..., 1:, :]), ("norm share", share)):
        if not np.all(np.isfinite(table)):
            raise PlannerError(
                f"the profile's residual {name} (from {', '.join(DRIFT_FIELDS)}) holds non-finite values after step 0"
            )
    return drift.mean(axis=(0, 1)).T, share.mean(axis=(0, 1)).T


def build_predictor(
    profiles: ProfileSet,
    block_weight: np.ndarray,
    prune_distortion: np.ndarray | None = None,
    pruned_flops: np.ndarray | None = None,
    sensitivity: np.ndarray | None = None,
) -> Predictor:
    """The cost and error model of a profile; pruning enters with each block's relative attention distortion and the
    measured `step_sensitivity` [prompt, step], when given, rescales the step weights."""
    drift, share = mean_drift(profiles)
    header = profiles.header
    block_flops = header.block_flops.astype(np.float64)
    if block_flops.sum() <= 0:
        raise PlannerError("the profile records no block FLOPs (cost/flops is all zero); re-profile")
    other = max(float(header.model_flops) - float(block_flops.sum()), 0.0)
    prune_error = np.zeros_like(drift) if prune_distortion is None else prune_distortion[:, None] * share
    weights = step_weights(header.sigmas)
    if sensitivity is not None:
        weights = sensitivity_weights(weights, drift, sensitivity)
    return Predictor(
        drift=drift,
        prune_error=prune_error,
        step_weight=weights,
        block_weight=np.asarray(block_weight, dtype=np.float64),
        block_flops=block_flops,
        pruned_flops=block_flops.copy() if pruned_flops is None else np.asarray(pruned_flops, dtype=np.float64),
        other_flops=other,
    ).rounded()


def sensitivity_weights(weights: np.ndarray, drift: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Step weights rescaled so that reusing the whole stack at one step predicts the measured final error.

    `measured` is [prompt, step] (`step_sensitivity`, NaN where not measured). At a measured step s the drift model
    predicts weight[s] · Σ_b drift[b, s] for that single reuse; the correction factor is measured / predicted. Between
    measured steps the factor is interpolated in log space (it spans two orders of magnitude), beyond them held at
    the nearest measured value.
    """
    mean = np.full(measured.shape[1], np.nan)
    seen = np.isfinite(measured).any(axis=0)
    mean[seen] = np.nanmean(measured[:, seen], axis=0)
    predicted = weights * drift.sum(axis=0)
    usable = np.isfinite(mean) & (mean > 0) & (predicted > 0)
    if not usable.any():
        return weights
    steps = np.flatnonzero(usable)
    log_factor = np.interp(np.arange(len(weights)), steps, np.log(mean[steps] / predicted[steps]))
    return weights * np.exp(log_factor)
