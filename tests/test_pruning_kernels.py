"""Pruned attention in fused-kernel shapes: rank padding, the kernels' head-dim rules, the planner's price of a
pruned call, and what pruning does to CPU wall time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_accel.planner import FitOptions, fit_plan
from dit_accel.planner.pca import pruned_block_flops
from dit_accel.planner.synthetic import SyntheticSpec, write_synthetic_profile
from dit_accel.runtime import PRUNE
from dit_accel.runtime.pruning import (
    ProjectedAttention,
    fused_kernels_accepting,
    kernel_rank,
    load_bases,
    pad_basis,
    pruned_attention,
    sdpa_backend,
    time_pruned_attention,
)


def orthonormal_basis(heads: int, head_dim: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(heads, head_dim, head_dim, generator=generator))[0][..., :rank]


@pytest.mark.parametrize(
    "rank, head_dim, expected", [(1, 128, 8), (15, 128, 16), (16, 128, 16), (21, 128, 24), (30, 32, 32), (3, 8, 8)]
)
def test_kernel_rank_rounds_up_to_eight_within_the_head_dim(rank, head_dim, expected):
    assert kernel_rank(rank, head_dim) == expected


def test_padding_leaves_the_pruned_attention_unchanged():
    query, key, value = (torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    basis = orthonormal_basis(2, 32, 15)
    padded = pad_basis(basis)
    assert padded.shape == (2, 32, 16) and torch.equal(padded[..., :15], basis)
    torch.testing.assert_close(
        pruned_attention(query, key, value, padded), pruned_attention(query, key, value, basis), rtol=0, atol=1e-6
    )


def test_runtime_bases_reach_sdpa_in_shapes_the_efficient_kernels_accept():
    """Ranks as PCA gives them (15, 21) are padded at load; SDPA then sees q/k dims the fused kernels take."""
    arrays = {f"pca.{b}": orthonormal_basis(12, 128, rank).numpy() for b, rank in enumerate((15, 21))}
    bases = load_bases(arrays, ("blocks.0", "blocks.1"), [0, 1], torch.device("cpu"), torch.float32)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append((args[0].shape[-1], args[1].shape[-1], args[2].shape[-1]))
            return func(*args, **(kwargs or {}))

    query = torch.randn(1, 12, 16, 128)
    for block in (0, 1):
        with Spy(), ProjectedAttention(bases[block]):
            F.scaled_dot_product_attention(query, query, query)
    assert seen == [(16, 16, 128), (24, 24, 128)]
    for qk_dim, _, v_dim in seen:
        assert fused_kernels_accepting(qk_dim, v_dim) == ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    assert fused_kernels_accepting(15, 128) == ()  # unpadded: math kernel, full score matrix
    assert fused_kernels_accepting(128, 128) == ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's kernel checks need a CUDA device")
def test_kernel_rule_agrees_with_torch_on_cuda():
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    for qk_dim, v_dim in ((16, 128), (15, 128), (128, 128), (24, 128)):
        q = torch.randn(1, 2, 64, qk_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 2, 64, v_dim, device="cuda", dtype=torch.bfloat16)
        params = SDPAParams(q, q, v, None, 0.0, False, False)
        accepted = fused_kernels_accepting(qk_dim, v_dim)
        assert can_use_flash_attention(params) == ("FLASH_ATTENTION" in accepted)
        assert can_use_efficient_attention(params) == ("EFFICIENT_ATTENTION" in accepted)


def test_cpu_runs_pruned_attention_on_the_math_kernel():
    """CPU's fused kernel needs one head dim for q, k and v: the full call takes it, a pruned call cannot."""
    query = torch.randn(1, 2, 64, 32)
    assert sdpa_backend(query, query, query) == "FLASH_ATTENTION"
    assert sdpa_backend(query[..., :16], query[..., :16], query) == "MATH"


def test_pruning_does_not_pay_on_cpu_where_tokens_far_exceed_the_head_dim():
    """4,096 tokens, head dim 64, rank 16: the pruned call (math kernel) is slower than the full one (fused)."""
    timing = time_pruned_attention(tokens=4096, heads=2, head_dim=64, rank=13, repeats=3, query_tokens=512)
    assert timing["kernel_rank"] == 16
    assert (timing["backend_full"], timing["backend_pruned"]) == ("FLASH_ATTENTION", "MATH")
    assert timing["ratio"] > 1.0, timing


def test_planner_prices_the_padded_rank_and_measured_ratios():
    flops = np.full(3, 1e9)
    tokens, heads, head_dim = 256, 2, 32
    priced = pruned_block_flops(flops, tokens, head_dim, np.array([3, 8, 25]), heads)
    # ranks 3 and 8 both run at rank 8; rank 25 runs at 32 = head_dim: no saving, never pruned
    assert priced[0] == priced[1] < flops[0] and priced[2] == flops[2]
    expected = flops[0] - 2.0 * tokens**2 * heads * (head_dim - 8) + 4.0 * tokens * heads * head_dim * 8
    assert priced[0] == pytest.approx(expected)
    attention = 4.0 * tokens**2 * heads * head_dim
    measured = pruned_block_flops(flops, tokens, head_dim, np.array([3, 8, 25]), heads, attention_ratio=0.75)
    np.testing.assert_allclose(measured, flops - 0.25 * attention)
    slower = pruned_block_flops(flops, tokens, head_dim, np.array([3, 8, 25]), heads, attention_ratio=2.5)
    np.testing.assert_array_equal(slower, flops)


@pytest.mark.parametrize("head_dim, prunes", [(8, False), (32, True)])
def test_planner_prunes_only_where_the_padded_call_is_cheaper(tmp_path, head_dim, prunes):
    path = write_synthetic_profile(tmp_path / "p.h5", SyntheticSpec(head_dim=head_dim))
    plan = fit_plan([path], FitOptions(method="unicp"))
    assert bool(np.any(plan.actions == PRUNE)) == prunes
    cheaper = plan.arrays["cost.pruned_flops"] < plan.arrays["cost.block_flops"]
    assert bool(np.all(cheaper)) == prunes
