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
