"""Uncompressed size of one prompt's profile data, computed from the schema (to project large-model profiles)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .recorder import DRIFT_METRICS, RecordSettings
from .run import MAX_STORED_VIDEO_BYTES
from .schema import FIELDS


@dataclass(frozen=True)
class ModelShape:
    """What the profile size depends on: blocks, token grid, attention heads, text tokens and output pixels."""

    blocks: int
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    text_tokens: int
    video_bytes: int
    has_text_attention: bool = True


def bytes_per_prompt(shape: ModelShape, settings: RecordSettings) -> dict[str, int]:
    """Bytes each field of one prompt takes before compression, by field name."""
    branches = 2 if settings.guidance_scale > 1.0 else 1
    steps, blocks, tokens = settings.num_inference_steps, shape.blocks, math.prod(shape.grid)
    astep = len(settings.attention_steps())
    queries = min(settings.query_samples, tokens)
    samples = min(settings.feature_samples, -(-settings.feature_samples // astep) * astep)
    counts = {name: branches * steps * blocks for name in DRIFT_METRICS}
    counts["model_output_rel_l1"] = branches * steps
    counts["foreground"] = tokens
    if settings.record_attention:
        counts.update(attention_steps=astep, query_index=queries, attention_received=astep * blocks * tokens)
        if shape.has_text_attention:
            counts["cross_attention"] = astep * blocks * queries * min(settings.cross_tokens, shape.text_tokens)
    if settings.record_features:
        counts["feature_queries"] = counts["feature_keys"] = blocks * samples * shape.heads * shape.head_dim
    if shape.video_bytes <= MAX_STORED_VIDEO_BYTES:
        counts["video"] = shape.video_bytes
    return {name: count * np.dtype(FIELDS[name].dtype).itemsize for name, count in counts.items()}


WAN_1_3B_480P = ModelShape(
    blocks=30, grid=(21, 30, 52), heads=12, head_dim=128, text_tokens=512, video_bytes=81 * 480 * 832 * 3
)
