"""PCAS: per-block, per-head PCA bases of the attention queries and keys, and what pruning with them costs.

For each block and head, scikit-learn's PCA (svd_solver="full", deterministic) is fitted on the profiled query and
key samples together (post-norm, post-RoPE, as they enter the attention scores), so one orthonormal basis P serves
both: scores are computed as (qP)(kP)ᵀ in rank-r space. The block's rank is the smallest r at which every head
explains at least `variance` of its q/k variance. Pruning keeps the value path and output projection unchanged.

The *distortion* of a basis is measured on the samples exactly as the runtime would prune (uncentred projection):
half the L1 distance between softmax(qkᵀ/√d) and softmax(qPPᵀkᵀ/√d) per query (total variation, in [0, 1]),
averaged over queries, heads and prompts. It is the relative error the planner expects in the block's residual on a
pruned step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlannerError


@dataclass(frozen=True)
class PcaBases:
    """Per block: basis [heads, head_dim, rank] (orthonormal columns), explained variance [heads], distortion."""

    bases: tuple[np.ndarray, ...]
    explained: tuple[np.ndarray, ...]
    distortion: np.ndarray

    @property
    def ranks(self) -> np.ndarray:
        return np.array([basis.shape[-1] for basis in self.bases])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plan arrays `pca.<block>` and `pca_explained.<block>`, float32."""
        arrays = {}
        for block, (basis, explained) in enumerate(zip(self.bases, self.explained)):
            arrays[f"pca.{block}"] = basis.astype(np.float32)
            arrays[f"pca_explained.{block}"] = explained.astype(np.float32)
        return arrays


def fit_pca_bases(queries: np.ndarray, keys: np.ndarray, variance: float) -> PcaBases:
    """Fit bases from samples shaped [prompt, block, sample, head, channel]."""
    if not 0.0 < variance <= 1.0:
        raise PlannerError(f"--pca-variance must be in (0, 1], got {variance}")
    if queries.shape != keys.shape or queries.ndim != 5:
        raise PlannerError(
            "feature samples must be [prompt, block, sample, head, channel] for queries and keys alike, got "
            f"{queries.shape} and {keys.shape}"
        )
    queries, keys = queries.astype(np.float64), keys.astype(np.float64)
    fitted = [_fit_block(queries[:, b], keys[:, b], variance) for b in range(queries.shape[1])]
    bases = tuple(basis for basis, _ in fitted)
    explained = tuple(share for _, share in fitted)
    distortion = np.array([_distortion(queries[:, b], keys[:, b], bases[b]) for b in range(queries.shape[1])])
    return PcaBases(bases, explained, distortion)


def _fit_block(queries: np.ndarray, keys: np.ndarray, variance: float) -> tuple[np.ndarray, np.ndarray]:
    """Basis [heads, head_dim, rank] and explained share per head for one block's [prompt, sample, head, dim]."""
    from sklearn.decomposition import PCA

    heads, dim = queries.shape[-2:]
    fits = []
    for head in range(heads):
        samples = np.concatenate([queries[..., head, :].reshape(-1, dim), keys[..., head, :].reshape(-1, dim)])
        fits.append(PCA(svd_solver="full").fit(samples))
    cumulative = [np.cumsum(fit.explained_variance_ratio_) for fit in fits]
    rank = max(min(int(np.searchsorted(c, variance - 1e-9)) + 1, len(c)) for c in cumulative)
    basis = np.stack([fit.components_[:rank].T for fit in fits])
    explained = np.array([c[rank - 1] for c in cumulative])
    return basis, explained


def _distortion(queries: np.ndarray, keys: np.ndarray, basis: np.ndarray) -> float:
    """Mean total-variation distance between exact and rank-reduced attention over the samples (see module doc)."""
    scale = 1.0 / np.sqrt(queries.shape[-1])
    projector = np.einsum("hdr,her->hde", basis, basis)
    distances = []
    for prompt_queries, prompt_keys in zip(queries, keys):
        exact = np.einsum("qhd,khd->hqk", prompt_queries, prompt_keys) * scale
        reduced = np.einsum("qhd,hde,khe->hqk", prompt_queries, projector, prompt_keys) * scale
        distances.append(0.5 * np.abs(_softmax(exact) - _softmax(reduced)).sum(axis=-1).mean())
    return float(np.mean(distances))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def pruned_block_flops(
    block_flops: np.ndarray,
    tokens: int,
    head_dim: int,
    ranks: np.ndarray,
    heads: int,
    attention_ratio: float | None = None,
) -> np.ndarray:
    """Cost of a pruned call of each block, in FLOPs, as the fused kernels run it: the planner prunes a block only
    where this is below `block_flops`.

    Without `attention_ratio`: QKᵀ at the *kernel rank* (the rank rounded up to a multiple of 8, at most head_dim:
    the runtime pads the basis so that the memory-efficient and cuDNN kernels take the call, see
    `dit_accel.runtime.pruning`) instead of head_dim, plus projecting q and k onto the padded basis. A block whose
    kernel rank reaches head_dim saves nothing, so the planner never prunes it.

    With `attention_ratio` (pruned / full attention wall time measured on the device the plan is for, e.g. by
    `dit_accel.runtime.pruning.time_pruned_attention` or the GPU suite's pruned-attention row): the block's
    attention FLOPs (4·tokens²·heads·head_dim) are scaled by that ratio, so a ratio of 1 or more (pruning measured
    slower, as on CPU) leaves the cost unchanged and nothing is pruned.

    FLOPs, not a wall-clock measurement taken here, are the default because plans are fitted on one machine and
    replayed on another (a CPU timing says nothing about the GPU kernels), and because the same profile and options
    must give the same plan bytes.
    """
    from dit_accel.runtime.pruning import kernel_rank

    if attention_ratio is not None:
        if not attention_ratio >= 0.0:
            raise PlannerError(f"a measured pruned/full attention time ratio must be >= 0, got {attention_ratio}")
        attention = 4.0 * tokens * tokens * heads * head_dim
        return np.clip(block_flops - attention * (1.0 - attention_ratio), 0.0, block_flops)
    padded = np.array([kernel_rank(rank, head_dim) for rank in np.asarray(ranks)], dtype=np.float64)
    saved = 2.0 * tokens * tokens * heads * (head_dim - padded)
    projection = 2.0 * 2.0 * tokens * heads * head_dim * padded
    return np.clip(block_flops - saved + projection, 0.0, block_flops)
