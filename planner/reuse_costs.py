"""Measured reuse costs: the error of replacing a step's whole-stack residual by an earlier one, per prompt.

The profiler records, per prompt, CFG branch and step s, the Gram matrix of the differences
`Y_i = R_{s−i} − R_s` (i = 1 … L) between the block stack's residual `R` (last block's output minus first block's
input) at s and at the L steps before it, and `‖h_out,s‖²`, the stack output's squared norm (field `reuse_gram`,
`stack_output_sq`; docs/profile-format.md). Everything a schedule's reuse does to step s follows exactly from it:

* reusing at run position j (the j-th step after the last computed step c = s − j) with a plain hold adds
  `E = R_s − R_c`, so `‖E‖² = G[j, j]`;
* with a calibrated slope, the runtime adds `R_c + β_j · D`, D = (R_c − R_{c−g}) / g the slope since the computed
  step before (g steps earlier), so the error is `‖E − β_j D‖² = ‖E‖² − 2β_j⟨E, D⟩ + β_j²‖D‖²`, with
  `⟨E, D⟩ = (G[j, j+g] − G[j, j]) / g` and `‖D‖² = (G[j, j] − 2G[j, j+g] + G[j+g, j+g]) / g²`.

`β_j` is fitted in closed form (least squares pooled over prompts, branches, steps and gaps): β_j = Σ⟨E, D⟩ / Σ‖D‖²,
clipped to [0, j] (α_j = β_j / j ∈ [0, 1] is the share of the line followed; β = 0 is a plain hold, β = 1 the
runtime's earlier fixed one-step move).

* with a *scaled hold* (profiles that also record ‖R_s‖², field `stack_residual_sq`), the runtime adds `γ_{s,j} R_c`:
  the residual's magnitude shrinks steadily over the denoising steps (MagCache's magnitude ratio, ≈ 0.95 a step on
  the default model), so a plain hold overshoots by about that much per step held, and shrinking towards zero is also
  the least-squares answer to the direction the residual turns. With `⟨R_s, R_c⟩ = (‖R_s‖² + ‖R_c‖² − G[j, j]) / 2`,
  the error is `‖R_s‖² − 2γ⟨R_s, R_c⟩ + γ²‖R_c‖²`, and γ is fitted per step and run position in closed form, pooled
  over prompts and branches: γ_{s,j} = Σ⟨R_s, R_c⟩ / Σ‖R_c‖², clipped to [0, 1.5].

Errors are relative to ‖h_out,s‖ and are exact under teacher forcing: they
say what reuse does to the step's block-stack output given the true inputs, not how errors compound later, which
the step weights (and the closed loop, `closed_loop.py`) account for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlannerError

REUSE_COST_FIELDS = ("reuse_gram", "stack_output_sq")
#: The profile field the scaled hold needs besides `REUSE_COST_FIELDS`.
SCALED_HOLD_FIELD = "stack_residual_sq"
#: Largest gain a scaled hold may apply.
MAX_GAIN = 1.5


@dataclass(frozen=True)
class ReuseCosts:
    """Per-prompt relative errors of whole-stack reuse, and the fitted slope scale per run position.

    `hold[p, s, j]` is the error of a plain hold at step s, run position j (index j − 1); `slope[p, s, j, g]` the
    error with the fitted `beta[j]` and a previous gap of g steps (index g − 1); `scaled[p, s, j]` the error of the
    hold scaled by the fitted `gain[s, j]` (both None when the profile lacks ‖R_s‖²); NaN where s has no such history.
    """

    hold: np.ndarray
    slope: np.ndarray
    beta: np.ndarray
    scaled: np.ndarray | None = None
    gain: np.ndarray | None = None

    @property
    def max_run(self) -> int:
        return self.hold.shape[-1]

    @property
    def max_gap(self) -> int:
        return self.slope.shape[-1]


def reuse_costs(
    gram: np.ndarray, output_sq: np.ndarray, max_run: int | None = None, residual_sq: np.ndarray | None = None
) -> ReuseCosts:
    """Hold, slope and (with `residual_sq`) scaled-hold errors, and the fitted β and γ, from profiled Gram matrices.

    Args:
        gram: [prompt, branch, step, L, L] Gram matrices of `R_{s−i} − R_s`, i = 1 … L (NaN where s − i < 0).
        output_sq: [prompt, branch, step] squared norm of the stack output.
        residual_sq: [prompt, branch, step] squared norm of the stack residual, or None.
        max_run: longest reuse run to price (default: as long as the recorded lags allow with a slope: (L − 1) // 2).

    Raises:
        PlannerError: the arrays disagree in shape or the lags are too few for any run.
    """
    gram, output_sq = np.asarray(gram, np.float64), np.asarray(output_sq, np.float64)
    if gram.ndim != 5 or gram.shape[-1] != gram.shape[-2] or gram.shape[:3] != output_sq.shape:
        raise PlannerError(f"reuse_gram {gram.shape} and stack_output_sq {output_sq.shape} do not match")
    lags = gram.shape[-1]
    runs = (lags - 1) // 2 if max_run is None else max_run
    if not 1 <= runs <= lags:
        raise PlannerError(f"the profile's {lags} reuse lags cannot price runs of {runs}; profile with more lags")
    gaps = lags - runs
    diag = np.diagonal(gram, axis1=-2, axis2=-1)
    hold_sq = diag[..., :runs]
    dot = np.full(gram.shape[:3] + (runs, gaps), np.nan)
    slope_sq = np.full_like(dot, np.nan)
    for j in range(runs):
        for g in range(gaps):
            k = j + g + 1
            if k >= lags:
                continue
            dot[..., j, g] = (gram[..., j, k] - diag[..., j]) / (g + 1)
            slope_sq[..., j, g] = (diag[..., j] - 2 * gram[..., j, k] + diag[..., k]) / (g + 1) ** 2
    beta = fit_beta(dot, slope_sq)
    error_sq = hold_sq[..., None] - 2 * beta[:, None] * dot + beta[:, None] ** 2 * slope_sq
    scale = np.sqrt(np.maximum(output_sq, 1e-30))
    hold = _branch_rms(np.sqrt(np.maximum(hold_sq, 0.0)) / scale[..., None])
    slope = _branch_rms(np.sqrt(np.maximum(error_sq, 0.0)) / scale[..., None, None])
    if residual_sq is None:
        return ReuseCosts(hold=hold, slope=slope, beta=beta)
    scaled_sq, gain = _scaled_hold(hold_sq, np.asarray(residual_sq, np.float64))
    scaled = _branch_rms(np.sqrt(np.maximum(scaled_sq, 0.0)) / scale[..., None])
    return ReuseCosts(hold=hold, slope=slope, beta=beta, scaled=scaled, gain=gain)


def _scaled_hold(hold_sq: np.ndarray, residual_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared errors [prompt, branch, step, run] of the scaled hold and the fitted gains [step, run].

    Raises:
        PlannerError: `residual_sq` does not match the Gram matrices' prompts, branches and steps.
    """
    if residual_sq.shape != hold_sq.shape[:3]:
        raise PlannerError(f"stack_residual_sq {residual_sq.shape} does not match reuse_gram {hold_sq.shape[:3]}")
    steps, runs = hold_sq.shape[2], hold_sq.shape[3]
    earlier = np.full(hold_sq.shape, np.nan)  # ‖R_c‖² of the computed step c = s − j
    for j in range(1, min(runs, steps - 1) + 1):  # runs may be longer than a few-step profile allows
        earlier[:, :, j:, j - 1] = residual_sq[:, :, : steps - j]
    dot = (residual_sq[..., None] + earlier - hold_sq) / 2
    valid = np.isfinite(dot) & np.isfinite(earlier)
    pooled_dot = np.where(valid, dot, 0.0).sum(axis=(0, 1))
    pooled_sq = np.where(valid, earlier, 0.0).sum(axis=(0, 1))
    gain = np.clip(np.divide(pooled_dot, pooled_sq, out=np.ones((steps, runs)), where=pooled_sq > 0), 0.0, MAX_GAIN)
    return residual_sq[..., None] - 2 * gain * dot + gain**2 * earlier, gain


def fit_beta(dot: np.ndarray, slope_sq: np.ndarray) -> np.ndarray:
    """β per run position minimising the pooled squared error: Σ⟨E, D⟩ / Σ‖D‖², clipped to [0, j]."""
    runs = dot.shape[-2]
    valid = np.isfinite(dot) & np.isfinite(slope_sq)
    moved = np.moveaxis(np.where(valid, dot, 0.0), -2, 0).reshape(runs, -1).sum(axis=1)
    spread = np.moveaxis(np.where(valid, slope_sq, 0.0), -2, 0).reshape(runs, -1).sum(axis=1)
    beta = np.divide(moved, spread, out=np.zeros(runs), where=spread > 0)
    return np.clip(beta, 0.0, np.arange(1, runs + 1, dtype=np.float64))


def _branch_rms(values: np.ndarray) -> np.ndarray:
    """[prompt, branch, …] → [prompt, …]: root mean square over CFG branches (NaN where any branch has none)."""
    return np.sqrt(np.mean(values**2, axis=1))
