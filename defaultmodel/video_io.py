"""Write generated videos to disk: animated GIF and PNG frame grid.

Frames are float arrays ``[F, H, W, 3]`` in [0, 1] (one video of the pipeline's "np" output).
The tiny 32x32 frames are enlarged with nearest-neighbour scaling so they stay crisp.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def _to_uint8(frames: np.ndarray, scale: int) -> np.ndarray:
    """[..., H, W, 3] floats in [0, 1] -> uint8, each pixel repeated ``scale`` times per axis."""
    pixels = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return pixels.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _check_video(frames: np.ndarray) -> None:
    """Reject anything that is not ``[F, H, W, 3]``."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape [F, H, W, 3], got {tuple(frames.shape)}")


def save_gif(frames: np.ndarray, path: str | os.PathLike, fps: int = 8, scale: int = 4) -> Path:
    """Write one video as a looping GIF; returns the path."""
    _check_video(frames)
    images = [Image.fromarray(f) for f in _to_uint8(frames, scale)]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def save_png_grid(videos: np.ndarray, path: str | os.PathLike, scale: int = 4) -> Path:
    """Write ``[B, F, H, W, 3]`` (or one ``[F, H, W, 3]`` video) as a grid: one row per video."""
    videos = videos[None] if videos.ndim == 4 else videos
    _check_video(videos[0])
    pixels = _to_uint8(videos, scale)
    b, f, h, w, _ = pixels.shape
    grid = pixels.transpose(0, 2, 1, 3, 4).reshape(b * h, f * w, 3)
    path = Path(path)
    Image.fromarray(grid).save(path)
    return path
