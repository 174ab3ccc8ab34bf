"""FLOP counting with torch's `FlopCounterMode`, including attention on the CPU.

torch counts `scaled_dot_product_attention` only for its CUDA kernels; on the CPU the call lowers to
`aten._scaled_dot_product_flash_attention_for_cpu`, which it counts as zero. `register_cpu_sdpa_formula()` adds the
same formula torch uses for the CUDA kernels (two batched matmuls) for that op, once per process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count, shape_wrapper

_CPU_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu",)


def _cpu_sdpa_flop(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def register_cpu_sdpa_formula() -> None:
    """Make `FlopCounterMode` count CPU attention (idempotent)."""
    for name in _CPU_SDPA_OPS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            flop_registry[op] = shape_wrapper(_cpu_sdpa_flop)


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run `fn()` under a FLOP counter; returns (total FLOPs, FLOPs per module path as torch names them)."""
    register_cpu_sdpa_formula()
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module
