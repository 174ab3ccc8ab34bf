"""Fidelity metrics of an accelerated video against the un-accelerated one (same model, same seed).

* PSNR is computed from the global MSE over the whole video (all frames, pixels and channels at once), not as a
  mean of per-frame PSNRs, so one bad frame cannot hide behind good ones: PSNR = 10·log10(range² / MSE).
* SSIM is the usual Gaussian-window SSIM (window 11, σ 1.5, K1 0.01, K2 0.03) per frame and channel, averaged.

Videos are arrays shaped (..., frames, height, width, channels) with values in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(video: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB from the global MSE; `inf` when the videos are identical."""
    video, reference = _check_pair(video, reference)
    mse = float(np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(video: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM over frames and channels (Gaussian window 11, σ 1.5)."""
    video, reference = _check_pair(video, reference)
    x = _as_images(video)
    y = _as_images(reference)
    window = _gaussian_window(min(11, x.shape[-1], x.shape[-2]), 1.5)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    sigma_x = _filter(x * x, window) - mu_x**2
    sigma_y = _filter(y * y, window) - mu_y**2
    sigma_xy = _filter(x * y, window) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
    return float(score.mean())


def _check_pair(video: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    video, reference = np.asarray(video), np.asarray(reference)
    if video.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {video.shape} vs {reference.shape}")
    return video, reference


def _as_images(video: np.ndarray) -> torch.Tensor:
    """(..., F, H, W, C) → (N, 1, H, W) float64, one image per frame and channel."""
    tensor = torch.from_numpy(np.ascontiguousarray(video, dtype=np.float64))
    height, width = tensor.shape[-3], tensor.shape[-2]
    return tensor.movedim(-1, -3).reshape(-1, 1, height, width)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    return F.conv2d(images, window)
