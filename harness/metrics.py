"""Fidelity metrics of an accelerated video against the un-accelerated one (same model, same seed).

* PSNR is computed from the global MSE over the whole video (all frames, pixels and channels at once), not as a
  mean of per-frame PSNRs, so one bad frame cannot hide behind good ones: PSNR = 10·log10(range² / MSE).
* SSIM is the usual Gaussian-window SSIM (window 11, σ 1.5, K1 0.01, K2 0.03) per frame and channel, averaged.

Videos are arrays shaped (..., frames, height, width, channels) with values in [0, 1]. Both metrics read the videos
`chunk_frames` frames at a time, so only that many frames of each are ever held in float64: a 480p × 81-frame pair
(two 97 MB float32 arrays) would need 390 MB of float64 copies at once, and SSIM's five filtered maps as much again.
Chunking changes only the order of the sums (results agree within 1e-9).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

#: Frames (of all videos in a batch, one after another) converted to float64 at a time.
CHUNK_FRAMES = 8


def psnr(video: np.ndarray, reference: np.ndarray, data_range: float = 1.0, chunk_frames: int = CHUNK_FRAMES) -> float:
    """PSNR in dB from the global MSE; `inf` when the videos are identical."""
    video, reference = _check_pair(video, reference)
    squared = sum(
        float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2))
        for x, y in zip(_frame_chunks(video, chunk_frames), _frame_chunks(reference, chunk_frames))
    )
    mse = squared / max(video.size, 1)
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(video: np.ndarray, reference: np.ndarray, data_range: float = 1.0, chunk_frames: int = CHUNK_FRAMES) -> float:
    """Mean SSIM over frames and channels (Gaussian window 11, σ 1.5)."""
    video, reference = _check_pair(video, reference)
    window = _gaussian_window(min(11, video.shape[-2], video.shape[-3]), 1.5)
    constants = ((0.01 * data_range) ** 2, (0.03 * data_range) ** 2)
    total, count = 0.0, 0
    for x, y in zip(_frame_chunks(video, chunk_frames), _frame_chunks(reference, chunk_frames)):
        score = _ssim_map(_as_images(x), _as_images(y), window, constants)
        total, count = total + float(score.sum()), count + score.numel()
    return total / count


def _ssim_map(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, constants: tuple[float, float]) -> torch.Tensor:
    """SSIM at every valid window position of (N, 1, H, W) float64 images."""
    c1, c2 = constants
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    sigma_x = _filter(x * x, window) - mu_x**2
    sigma_y = _filter(y * y, window) - mu_y**2
    sigma_xy = _filter(x * y, window) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))


def _frame_chunks(video: np.ndarray, chunk_frames: int) -> Iterator[np.ndarray]:
    """(..., F, H, W, C) as consecutive (≤ chunk_frames, H, W, C) views (copies only if the array is not contiguous)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    frames = video.reshape(-1, *video.shape[-3:])
    for start in range(0, frames.shape[0], chunk_frames):
        yield frames[start : start + chunk_frames]


def _check_pair(video: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    video, reference = np.asarray(video), np.asarray(reference)
    if video.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {video.shape} vs {reference.shape}")
    return video, reference


def _as_images(video: np.ndarray) -> torch.Tensor:
    """(F, H, W, C) → (F·C, 1, H, W) float64, one image per frame and channel."""
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
