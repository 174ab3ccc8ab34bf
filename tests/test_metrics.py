"""Fidelity metrics: PSNR from the global MSE, SSIM bounds and sensitivity; FLOPs count CPU attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dit_accel.harness.metrics import psnr, ssim
from dit_accel.profiler.flops import count_flops


def test_psnr_uses_global_mse():
    ref = np.zeros((2, 4, 8, 8, 3))
    video = ref.copy()
    video[0, 0] = 0.1  # one frame off by 0.1 everywhere: MSE = 0.01 / 8 frames
    assert psnr(video, ref) == pytest.approx(10 * math.log10(8 / 0.01))
    assert psnr(ref, ref) == math.inf


def test_ssim_is_one_for_identical_and_drops_with_noise():
    rng = np.random.default_rng(0)
    ref = rng.random((3, 16, 16, 3))
    assert ssim(ref, ref) == pytest.approx(1.0)
    noisy = np.clip(ref + rng.normal(0, 0.2, ref.shape), 0, 1)
    assert ssim(noisy, ref) < 0.9
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(ref, ref[:2])


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(1, 2, 64, 16)
    total, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert total == 2 * (2 * 2 * 64 * 16 * 64)


def reference_ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of the whole video at once in float64 (the form chunking replaced), for comparison."""
    from dit_accel.harness.metrics import _as_images, _gaussian_window, _ssim_map

    x, y = (_as_images(v.reshape(-1, *v.shape[-3:])) for v in (video, reference))
    return float(_ssim_map(x, y, _gaussian_window(11, 1.5), (0.01**2, 0.03**2)).mean())


@pytest.mark.parametrize("chunk_frames", [1, 3, 8, 100])
def test_chunked_metrics_equal_the_whole_video_computation(chunk_frames):
    rng = np.random.default_rng(1)
    reference = rng.random((2, 7, 24, 20, 3)).astype(np.float32)  # 14 frames: chunks do not divide it evenly
    video = np.clip(reference + rng.normal(0, 0.05, reference.shape), 0, 1).astype(np.float32)
    expected = reference_ssim(video, reference)
    assert ssim(video, reference, chunk_frames=chunk_frames) == pytest.approx(expected, abs=1e-9)
    mse = np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2)
    assert psnr(video, reference, chunk_frames=chunk_frames) == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)
    with pytest.raises(ValueError, match="chunk_frames"):
        ssim(video, reference, chunk_frames=0)


def test_ssim_holds_a_chunk_of_frames_in_float64_not_the_videos():
    """Peak numpy memory while scoring 48 float32 frames: a few frames' worth, far below two float64 copies."""
    import tracemalloc

    rng = np.random.default_rng(2)
    reference = rng.random((48, 64, 64, 3), dtype=np.float32)
    video = reference.copy()
    video[::2] += np.float32(0.01)
    whole_copies = 2 * reference.size * 8
    tracemalloc.start()
    try:
        ssim(video, reference, chunk_frames=4)
        psnr(video, reference, chunk_frames=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < whole_copies / 4, (peak, whole_copies)
