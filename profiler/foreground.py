"""Foreground masks from the model's own prediction, with no external segmentation model.

The estimate of the clean latent at the last denoising step is cut into the transformer's token grid. In every
frame the dominant appearance is taken as background (the per-frame median token feature); each token's distance
to it is clustered into two groups (k-means, fixed seed), and the far group is the foreground.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def latent_to_token_features(
    latent: np.ndarray,
    layout: str,
    patch: tuple[int, int, int],
    grid: tuple[int, int, int],
    latent_channels: int | None = None,
) -> np.ndarray:
    """One sample's latent as (frames, height, width, features) on the token grid.

    `latent` is one batch row in the transformer's input layout (`CFHW`, `FCHW`, or `tokens` = (N, C)). For
    channel-first layouts, `latent_channels` keeps only the leading channels: pipelines that append conditioning
    to the noisy latents (Wan image-to-video's mask and image latents) put it after them, and an image or a
    mask would otherwise look like foreground.
    """
    frames, height, width = grid
    if layout == "tokens":
        return latent.reshape(frames, height, width, -1)
    if layout == "BFCHW":
        latent = latent.transpose(1, 0, 2, 3)
    latent = latent[:latent_channels]
    channels = latent.shape[0]
    pt, ph, pw = patch
    latent = latent[:, : frames * pt, : height * ph, : width * pw]
    blocks = latent.reshape(channels, frames, pt, height, ph, width, pw)
    return blocks.transpose(1, 3, 5, 0, 2, 4, 6).reshape(frames, height, width, -1)


def foreground_mask(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """Binary (frames, height, width) mask of tokens that stand out from their frame's dominant appearance."""
    frames = features.shape[0]
    flat = features.reshape(frames, -1, features.shape[-1]).astype(np.float64)
    scale = flat.reshape(-1, flat.shape[-1]).std(axis=0) + 1e-8
    background = np.median(flat, axis=1, keepdims=True)
    distance = np.linalg.norm((flat - background) / scale, axis=-1).reshape(-1, 1)
    if np.ptp(distance) < 1e-6:
        return np.zeros(features.shape[:3], dtype=np.uint8)
    labels = KMeans(n_clusters=2, n_init=4, random_state=seed).fit(distance)
    far = int(np.argmax(labels.cluster_centers_[:, 0]))
    return (labels.labels_ == far).reshape(features.shape[:3]).astype(np.uint8)
