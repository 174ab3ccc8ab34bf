"""Synthetic profiles with known answers, written through the real profile schema (for tests, docs and demos).

The drift of every block and step is given directly (relative L1 of the residual; residual norm 1 and stack output
norm 10, so the planner's normalised drift is rel_l1 / 10); foreground-focused blocks put their high attention inside
a fixed foreground square and background blocks outside it; q/k feature samples lie in a `rank`-dimensional subspace
per head (plus tiny noise), so PCA recovers that rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dit_accel.profiler.schema import ProfileHeader, ProfileWriter, PromptInfo, prompt_key
from dit_accel.runtime.plan import ModelFingerprint

GRID = (2, 4, 4)
HEADS, HEAD_DIM, SAMPLES = 2, 8, 24
BLOCK_FLOPS, OTHER_FLOPS = 400_000, 16_000


@dataclass(frozen=True)
class SyntheticSpec:
    """What a synthetic profile holds. `drift` is rel_l1 [steps, blocks]; default: a U-curve, equal for all blocks."""

    steps: int = 12
    blocks: int = 4
    drift: np.ndarray | None = None
    foreground_blocks: tuple[int, ...] = (0,)
    rank: int = 2
    head_dim: int = HEAD_DIM
    prompts: int = 2
    transformer_class: str = "WanTransformer3DModel"
    config_hash: str = "0" * 64
    block_prefix: str = "blocks"
    omit: tuple[str, ...] = ()
    settings: dict = field(default_factory=lambda: {"guidance_scale": 5.0})

    def drift_table(self) -> np.ndarray:
        if self.drift is not None:
            return np.asarray(self.drift, dtype=np.float64)
        fraction = np.linspace(0.0, 1.0, self.steps)
        curve = 0.02 + 0.3 * (2 * fraction - 1) ** 4
        return np.repeat(curve[:, None], self.blocks, axis=1)


def foreground_mask() -> np.ndarray:
    """The synthetic foreground: a 2×2 square in every frame of the 2×4×4 token grid."""
    mask = np.zeros(GRID, dtype=np.uint8)
    mask[:, 1:3, 1:3] = 1
    return mask


def synthetic_header(spec: SyntheticSpec) -> ProfileHeader:
    fingerprint = ModelFingerprint(
        spec.transformer_class, spec.config_hash, tuple(f"{spec.block_prefix}.{b}" for b in range(spec.blocks))
    )
    return ProfileHeader(
        fingerprint=fingerprint,
        settings={"num_inference_steps": spec.steps, **spec.settings},
        branches=("cond", "uncond"),
        grid=GRID,
        adapter="wan",
        cfg_mode="separate",
        timesteps=np.linspace(999.0, 0.0, spec.steps),
        sigmas=np.linspace(1.0, 1.0 / spec.steps, spec.steps),
        block_flops=np.full(spec.blocks, BLOCK_FLOPS, dtype=np.int64),
        block_seconds=np.full(spec.blocks, 1e-3),
        model_flops=spec.blocks * BLOCK_FLOPS + OTHER_FLOPS,
        model_seconds=spec.blocks * 1e-3,
    )


def synthetic_arrays(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All per-prompt fields of one prompt."""
    branches, steps, blocks = 2, spec.steps, spec.blocks
    rel = np.broadcast_to(spec.drift_table(), (branches, steps, blocks)).copy()
    rel[:, 0] = np.nan
    ones = np.ones((branches, steps, blocks))
    arrays = {
        "residual_rel_l1": rel,
        "output_rel_l1": rel / 10,
        "residual_cos": 1 - rel,
        "output_cos": 1 - rel / 10,
        "residual_norm": ones,
        "output_norm": 10 * ones,
        "motion": np.full((branches, steps, blocks), 0.3),
        "model_output_rel_l1": rel.mean(axis=-1),
        "attention_steps": np.array([0, steps // 2]),
        "attention_received": _attention(spec, rng),
        "foreground": foreground_mask(),
        "query_index": np.arange(8),
        "cross_attention": rng.random((2, blocks, 8, 4)),
    }
    arrays["feature_queries"], arrays["feature_keys"] = _features(spec, rng)
    return {name: value for name, value in arrays.items() if name not in spec.omit}


def _attention(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    mask = foreground_mask().astype(bool)
    attention = np.empty((2, spec.blocks, *GRID))
    for block in range(spec.blocks):
        focus = mask if block in spec.foreground_blocks else ~mask
        attention[:, block] = np.where(focus, 1.0, 0.1) + 0.01 * rng.random((2, *GRID))
    return attention


def _features(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Samples in one fixed `rank`-dimensional subspace (the same for every prompt), plus tiny noise."""
    dim = spec.head_dim
    basis = np.linalg.qr(np.random.default_rng(1234).standard_normal((dim, dim)))[0][:, : spec.rank]
    shape = (spec.blocks, SAMPLES, HEADS, spec.rank)
    queries = rng.standard_normal(shape) @ basis.T * 2 + 1e-3 * rng.standard_normal((*shape[:3], dim))
    keys = rng.standard_normal(shape) @ basis.T * 2 + 1e-3 * rng.standard_normal((*shape[:3], dim))
    return queries, keys


def write_synthetic_profile(path: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0) -> str:
    """Write a complete synthetic profile to `path`, replacing any file there (same spec and seed, same content)."""
    rng = np.random.default_rng(seed)
    Path(path).unlink(missing_ok=True)
    prompts = [
        (PromptInfo(prompt_key(i), i, f"synthetic prompt {i}", "", seed + i), synthetic_arrays(spec, rng))
        for i in range(spec.prompts)
    ]
    ProfileWriter(path, synthetic_header(spec)).add_prompts(prompts)
    return str(path)
