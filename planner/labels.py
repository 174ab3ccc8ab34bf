"""ProfilingDiT block labels: is a block's attention focused on the foreground or on the background?

For every prompt, attention step, block and frame, the tokens whose received attention is at or above the frame's
`quantile` (top 1 − quantile of tokens) are the block's *high-attention* tokens. A block's score is the paper's
R = |high ∩ foreground| / |foreground|: the share of the frame's foreground tokens that receive high attention,
averaged over prompts, attention steps and frames (frames with an empty mask are skipped). Chance is the score of
high-attention tokens placed at random: the share of the frame's tokens that are high (1 − quantile without ties).

Rule `threshold` (default): foreground when score ≥ τ and above chance. The paper's τ is not public (its released
code takes hand-written block lists), so τ defaults to `CHANCE_RATIO` × chance (capped half-way between chance and 1):
a block is foreground-focused when foreground tokens are 1.5 times over-represented among its high-attention tokens.
Rule `kmeans`: two clusters of the scores (scikit-learn KMeans, random_state 0, n_init 10); the higher-centred
cluster is foreground and τ is the mid-point of the two centres (when all scores are equal it falls back to the
threshold rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlannerError

RULES = ("threshold", "kmeans")
#: Default threshold as a multiple of chance: foreground tokens over-represented 1.5x among high-attention tokens.
CHANCE_RATIO = 1.5


@dataclass(frozen=True)
class BlockLabels:
    """Per block: label ('foreground' / 'background'), score in [0, 1]; the threshold used and chance level."""

    labels: tuple[str, ...]
    scores: np.ndarray
    threshold: float
    chance: float

    @property
    def background(self) -> np.ndarray:
        return np.array([label == "background" for label in self.labels])


def _coverage(attention: np.ndarray, foreground: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """(R per prompt, step, block and frame with NaN where the mask is empty; share of tokens that are high there)
    from attention [prompt, astep, block, F, H, W] and masks [prompt, F, H, W]."""
    if attention.shape[-3:] != foreground.shape[-3:]:
        raise PlannerError(
            f"attention maps have grid {attention.shape[-3:]} but foreground masks {foreground.shape[-3:]}"
        )
    prompts, asteps, blocks, frames = attention.shape[:4]
    received = attention.astype(np.float32).reshape(prompts, asteps, blocks, frames, -1)
    mask = foreground.reshape(prompts, 1, 1, frames, -1) > 0
    high = received >= np.quantile(received, quantile, axis=-1, keepdims=True)
    valid = np.broadcast_to(mask.any(axis=-1), high.shape[:-1])
    if not valid.any():
        raise PlannerError("every profiled foreground mask is empty; labels need a foreground")
    covered = np.where(valid, (high & mask).sum(axis=-1) / np.maximum(mask.sum(axis=-1), 1), np.nan)
    return covered, np.where(valid, high.mean(axis=-1), np.nan)


def foreground_scores(attention: np.ndarray, foreground: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """(score per block, chance level) from attention [prompt, astep, block, F, H, W] and masks [prompt, F, H, W]."""
    covered, high_share = _coverage(attention, foreground, quantile)
    blocks = covered.shape[2]
    scores = np.nanmean(np.moveaxis(covered, 2, 0).reshape(blocks, -1), axis=1)
    return scores, float(np.nanmean(high_share))


def score_distribution(
    attention: np.ndarray, foreground: np.ndarray, quantile: float, percentiles: tuple[float, ...] = (10, 50, 90)
) -> np.ndarray:
    """Per block, `percentiles` of its per-(prompt, step, frame) scores, [blocks, len(percentiles)]: the evidence of
    whether a model's blocks specialise (docs/methods.md shows it for the default model)."""
    covered = _coverage(attention, foreground, quantile)[0]
    per_block = np.moveaxis(covered, 2, 0).reshape(covered.shape[2], -1)
    return np.nanpercentile(per_block, percentiles, axis=1).T


def label_blocks(
    scores: np.ndarray, chance: float, rule: str = "threshold", threshold: float | None = None
) -> BlockLabels:
    """Label blocks from their scores by `rule` (see the module docstring)."""
    if rule not in RULES:
        raise PlannerError(f"unknown label rule {rule!r} (known: {', '.join(RULES)})")
    tau = min(CHANCE_RATIO * chance, (chance + 1.0) / 2.0) if threshold is None else float(threshold)
    if rule == "kmeans" and np.ptp(scores) > 1e-6:
        tau = _kmeans_threshold(scores)
    labels = tuple("foreground" if s >= tau and s > chance + 1e-9 else "background" for s in scores)
    return BlockLabels(labels, scores.astype(np.float32), tau, chance)


def _kmeans_threshold(scores: np.ndarray) -> float:
    from sklearn.cluster import KMeans

    centres = (
        KMeans(n_clusters=2, n_init=10, random_state=0)
        .fit(scores.reshape(-1, 1).astype(np.float64))
        .cluster_centers_.ravel()
    )
    return float(centres.mean())


def fit_labels(
    attention: np.ndarray,
    foreground: np.ndarray,
    quantile: float = 0.8,
    rule: str = "threshold",
    threshold: float | None = None,
) -> BlockLabels:
    """Scores and labels of every block from profiled attention and foreground masks."""
    if not 0.0 <= quantile < 1.0:
        raise PlannerError(f"label quantile must be in [0, 1), got {quantile}")
    scores, chance = foreground_scores(attention, foreground, quantile)
    return label_blocks(scores, chance, rule, threshold)
