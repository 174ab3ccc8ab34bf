"""PCA-sliced attention (UniCP's PCAS) for a block's prune steps.

On a prune step, the scores of the block's self-attention (or joint attention) are computed in the block's PCA
basis: per head, q' = q·P and k' = k·P with P of shape (head_dim, rank), orthonormal columns, and softmax(q'k'ᵀ·s)
with the *unchanged* scale s = 1/√head_dim, so q'k'ᵀ approximates qkᵀ by the variance the basis keeps. Values are
not projected.

Where the basis is applied: for attention without RoPE or per-head query/key normalisation, P could be folded into
the query/key projection weights. Every supported video DiT applies RMS-norm and/or RoPE *after* the projection
(Wan normalises across heads, then rotates), and neither commutes with P, so the runtime projects the tensors that
reach `scaled_dot_product_attention`: two (tokens × head_dim × rank) matmuls per head, against a saving of
tokens² × (head_dim − rank) in the score matmul. The basis tensors are moved to the block's device and dtype once,
at apply time. The projection is applied by observing the attention module's `scaled_dot_product_attention` call
through a `TorchFunctionMode` entered only around that module on prune steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import PlanError


def project_qk(query: torch.Tensor, key: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project (batch, heads, tokens, head_dim) queries and keys onto per-head bases (heads, head_dim, rank)."""
    return torch.einsum("bhsd,hdr->bhsr", query, basis), torch.einsum("bhsd,hdr->bhsr", key, basis)


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
        query, key = kwargs["query"], kwargs["key"]
        if query.shape[1] != self.basis.shape[0] or query.shape[-1] != self.basis.shape[1]:
            return func(**kwargs)
        if kwargs.get("scale") is None:
            kwargs["scale"] = 1.0 / math.sqrt(query.shape[-1])
        kwargs["query"], kwargs["key"] = project_qk(query, key, self.basis.to(query.dtype))
        return func(**kwargs)


def load_bases(
    arrays: dict[str, Any],
    block_ids: tuple[str, ...],
    prune_blocks: list[int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, torch.Tensor]:
    """The PCA basis of every block that has prune steps (plan arrays `pca.<block index>`), ready on `device`."""
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
        bases[block] = torch.as_tensor(array, dtype=dtype, device=device)
    return bases
