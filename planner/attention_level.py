"""UniCP's attention-level caching in the planner: what a reuse cell costs and risks when only the block's
self-attention is skipped (plan policy `cache_level: attention`, replayed by `dit_accel.runtime.replay`).

**Cost.** At an attention-level reuse cell the block still runs; only its self-attention is replaced by the output
cached at the block's last computed step. The cell costs the block's FLOPs less its self-attention's, so the FLOP
speedup counts self-attention FLOPs only, and every block call still happens (block-call speedup 1).

Self-attention FLOPs are estimated from the profile's token grid and the attention width (heads × head dim, from
the profiled q/k feature samples): four width × width projections (q, k, v, out: 8·N·W² FLOPs for N tokens) plus
the scores and the weighted values (4·N²·W), at most the block's profiled FLOPs. This is the count torch's FLOP
counter gives Wan's `attn1` (tests/test_unicp_attention.py pins it on the default model); an attention with other
projections (joint attention's text stream) is estimated without them.

**Error.** The error model is the predictor's (`dit_accel.planner.predict`) with the block drift replaced by the
self-attention output's drift between adjacent steps (profile field `attention_rel_l1`, in the predictor's units:
times the block residual's share of the stack output), the error a stale attention output carries into the block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from dit_accel.runtime.plan import REUSE

from .predict import Predictor


def self_attention_flops(block_flops: np.ndarray, tokens: int, heads: int, head_dim: int) -> np.ndarray:
    """Estimated FLOPs of each block's self-attention over `tokens` tokens (see the module docstring)."""
    width = float(heads * head_dim)
    flops = 8.0 * tokens * width * width + 4.0 * float(tokens) * tokens * width
    return np.minimum(np.asarray(block_flops, np.float64), flops)


@dataclass(frozen=True)
class AttentionLevelPredictor(Predictor):
    """The predictor of an attention-level plan: a reuse cell costs its block less the block's self-attention."""

    attention_flops: np.ndarray

    @classmethod
    def of(cls, predictor: Predictor, drift: np.ndarray, attention_flops: np.ndarray) -> AttentionLevelPredictor:
        """`predictor` with the attention-output drift as its drift and attention-level reuse costs."""
        values = {f.name: getattr(predictor, f.name) for f in fields(Predictor)}
        return cls(**{**values, "drift": drift}, attention_flops=np.asarray(attention_flops, np.float64))

    def _flop_table(self, blocks: np.ndarray | slice = slice(None)) -> np.ndarray:
        table = super()._flop_table(blocks).copy()
        table[..., REUSE] = self.block_flops[blocks] - self.attention_flops[blocks]
        return table

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The model as plan arrays, with `cost.attention_flops` (the runtime's claims check reads it)."""
        return {**super().to_arrays(), "cost.attention_flops": self.attention_flops.astype(np.float64)}

    def summary(self, actions: np.ndarray) -> dict[str, float]:
        """The `predicted` entry: a static plan's, with the block-call speedup (1: every block call runs)."""
        return {**super().summary(actions), "block_call_speedup": 1.0}
