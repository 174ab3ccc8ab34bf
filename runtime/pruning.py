"""PCA-sliced attention (UniCP's PCAS) for a block's prune steps, in shapes the fused SDPA kernels accept.

On a prune step, the scores of the block's self-attention (or joint attention) are computed in the block's PCA
basis: per head, q' = q·P and k' = k·P with P of shape (head_dim, rank), orthonormal columns, and softmax(q'k'ᵀ·s)
with the *unchanged* scale s = 1/√head_dim, so q'k'ᵀ approximates qkᵀ by the variance the basis keeps. Values are
not projected.

Where the basis is applied: for attention without RoPE or per-head query/key normalisation, P could be folded into
the query/key projection weights. Every supported video DiT applies RMS-norm and/or RoPE *after* the projection
(Wan normalises across heads, then rotates), and neither commutes with P, so the runtime projects the tensors that
reach `scaled_dot_product_attention`: two (tokens × head_dim × rank) matmuls per head, against a saving of
tokens² × (head_dim − rank) in the score matmul. The projection is applied by observing the attention module's
`scaled_dot_product_attention` call through a `TorchFunctionMode` entered only around that module on prune steps.

Kernel shapes. PyTorch's fused CUDA kernels constrain the last dimensions (torch 2.x `sdp_utils.cpp`): flash needs
q, k and v of *one* head dim, a multiple of 8, at most 256; memory-efficient needs q and k alike, and q's and v's
dims each a multiple of the GEMM alignment (8 in half precision, 4 in float32 on sm80+); cuDNN needs q/k and v dims
that are multiples of 8. A pruned call has q/k of the rank and v of the head dim, so flash never takes it, and a
rank that is not a multiple of 8 (PCA gives ranks like 15 or 21) leaves only the math kernel, which materialises
the tokens × tokens score matrix. The runtime therefore pads every basis with zero columns up to `kernel_rank`
(the rank rounded up to a multiple of `KERNEL_ALIGNMENT`, at most the head dim): the extra channels of q' and k'
are exactly zero, so the scores are unchanged, and the memory-efficient and cuDNN kernels accept the shapes. The
planner prices a pruned call at that padded rank (`dit_accel.planner.pca.pruned_block_flops`). On CPU, PyTorch's
fused (flash) kernel also needs equal q/k/v dims, so a pruned call always runs the math kernel there.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import PlanError

#: The head-dim multiple every fused CUDA attention kernel accepts in half precision (see the module docstring).
KERNEL_ALIGNMENT = 8


def kernel_rank(rank: int, head_dim: int) -> int:
    """The rank a pruned call runs at: `rank` rounded up to a multiple of `KERNEL_ALIGNMENT`, at most `head_dim`."""
    return min(-(-int(rank) // KERNEL_ALIGNMENT) * KERNEL_ALIGNMENT, int(head_dim))


def fused_kernels_accepting(qk_dim: int, v_dim: int, half_precision: bool = True) -> tuple[str, ...]:
    """The fused CUDA SDPA kernels whose head-dim rules (torch 2.x `sdp_utils.cpp`, sm80+) accept q/k of `qk_dim`
    and v of `v_dim` channels; empty means the math kernel. Other rules (dtype, masks, GPU generation, cuDNN
    version) still apply on the device: `sdpa_backend` asks PyTorch itself there.
    """
    alignment = 8 if half_precision else 4
    accepted = []
    if qk_dim == v_dim and qk_dim % 8 == 0 and qk_dim <= 256 and half_precision:
        accepted.append("FLASH_ATTENTION")
    if qk_dim % alignment == 0 and v_dim % alignment == 0:
        accepted.append("EFFICIENT_ATTENTION")
    if qk_dim % 8 == 0 and v_dim % 8 == 0 and max(qk_dim, v_dim) <= 256:
        accepted.append("CUDNN_ATTENTION")
    return tuple(accepted)


def pad_basis(basis: torch.Tensor) -> torch.Tensor:
    """A (heads, head_dim, rank) basis with zero columns appended up to `kernel_rank` (scores are unchanged)."""
    heads, head_dim, rank = basis.shape
    padding = kernel_rank(rank, head_dim) - rank
    if padding == 0:
        return basis
    return torch.cat([basis, basis.new_zeros(heads, head_dim, padding)], dim=-1)


def project_qk(query: torch.Tensor, key: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project (batch, heads, tokens, head_dim) queries and keys onto per-head bases (heads, head_dim, rank)."""
    return torch.einsum("bhsd,hdr->bhsr", query, basis), torch.einsum("bhsd,hdr->bhsr", key, basis)


def pruned_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, basis: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """SDPA with scores in the basis' space and the full head dim's scale (what a prune step computes)."""
    if kwargs.get("scale") is None:
        kwargs["scale"] = 1.0 / math.sqrt(query.shape[-1])
    query, key = project_qk(query, key, basis.to(query.dtype))
    return F.scaled_dot_product_attention(query, key, value, **kwargs)


class ProjectedAttention(TorchFunctionMode):
    """Replaces the `scaled_dot_product_attention` call(s) it sees by their PCA-projected version."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        self.basis = basis

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        kwargs.update(dict(zip(names, args)))
        query = kwargs["query"]
        if query.shape[1] != self.basis.shape[0] or query.shape[-1] != self.basis.shape[1]:
            return func(**kwargs)
        return pruned_attention(kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value"), self.basis, **kwargs)


def load_bases(
    arrays: dict[str, Any],
    block_ids: tuple[str, ...],
    prune_blocks: list[int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, torch.Tensor]:
    """The PCA basis of every block that has prune steps (plan arrays `pca.<block index>`), padded to its kernel
    rank (`pad_basis`) and ready on `device`."""
    bases = {}
    for block in prune_blocks:
        array = arrays.get(f"pca.{block}")
        if array is None:
            raise PlanError(f"block {block_ids[block]} has prune steps but the plan has no basis 'pca.{block}'")
        if array.ndim != 3 or array.shape[2] > array.shape[1] or array.shape[2] < 1:
            raise PlanError(
                f"plan basis 'pca.{block}' must have shape (heads, head_dim, rank) with 1 <= rank <= head_dim, got "
                f"{array.shape}"
            )
        bases[block] = pad_basis(torch.as_tensor(array, dtype=dtype, device=device))
    return bases


def sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """The kernel `scaled_dot_product_attention` picks for these tensors on their device ("FLASH_ATTENTION",
    "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH", …), from PyTorch's own dispatcher (`torch._fused_sdp_choice`,
    a private function: "unknown" where this torch lacks it)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    from torch.nn.attention import SDPBackend

    return SDPBackend(int(choose(query, key, value))).name


def time_pruned_attention(
    tokens: int,
    heads: int,
    head_dim: int,
    rank: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    query_tokens: int | None = None,
) -> dict[str, Any]:
    """Wall time of full against pruned attention (basis padded as the runtime pads it), interleaved medians.

    `query_tokens` (default: `tokens`) times only that many queries against all keys: both kernels scale linearly
    in the query count, so the ratio holds and a CPU can measure a long video's key count cheaply. Returns the
    kernels SDPA picks for each form, the padded rank, both medians in seconds and `ratio` = pruned / full.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    query = torch.randn(1, heads, query_tokens or tokens, head_dim, generator=generator).to(device, dtype)
    key, value = (torch.randn(1, heads, tokens, head_dim, generator=generator).to(device, dtype) for _ in range(2))
    basis = pad_basis(torch.linalg.qr(torch.randn(heads, head_dim, head_dim, generator=generator))[0][..., :rank])
    basis = basis.to(device, dtype)
    projected = project_qk(query, key, basis)
    forms: dict[str, Callable[[], Any]] = {
        "full": lambda: F.scaled_dot_product_attention(query, key, value),
        "pruned": lambda: pruned_attention(query, key, value, basis),
    }
    times = interleaved_medians(forms, repeats, torch.device(device))
    return {
        "backend_full": sdpa_backend(query, key, value),
        "backend_pruned": sdpa_backend(*projected, value),
        "kernel_rank": basis.shape[-1],
        "full_s": times["full"],
        "pruned_s": times["pruned"],
        "ratio": times["pruned"] / times["full"],
    }


def interleaved_medians(forms: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each callable over `repeats` rounds that run every callable once, after one warm-up;
    on CUDA synchronised around every timing."""

    def timed(run: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for run in forms.values():
        timed(run)
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, run in forms.items():
            samples[name].append(timed(run))
    return {name: statistics.median(values) for name, values in samples.items()}
