"""What the bench measures on every run, and the definitions behind each number.

* **Block calls**: a block counts as computed when its first attention module (from the model adapter) really
  computes, seen by a forward pre-hook on that module's query projection (`to_q`, or its first parameterised
  submodule). A hook that replaces the whole block (plans, FirstBlockCache, MagCache, SeaCache) or only the attention
  (PAB, TaylorSeer) therefore shows as a skipped block call. Every attention module of the adapter is counted the same
  way, per kind (self, cross, joint), so attention-only skipping is visible too.
* **Cache memory**: bytes of every tensor reachable from the state of the diffusers hooks installed on the
  transformer (the plan's own hooks and every peer's), sampled after each transformer call, maximum over the
  generation. On CUDA the peak of `torch.cuda.max_memory_allocated` is reported as well.
* **Fidelity**: PSNR from the global MSE over the whole video (every frame, pixel and channel at once) and SSIM, both
  against the un-accelerated video of the same seed (`dit_accel.harness.metrics`); LPIPS with user-supplied TorchScript
  weights.
* **Caching bound**: T / (T_c + (T − T_c)·ρ) with T_c = T·(computed block calls / block calls of the full run), so a
  step with half its blocks computed counts half, and ρ the non-block share of the full run's FLOPs (what a step whose
  blocks are all skipped still pays: embeddings, head, text encoder and decoder amortised per step).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_accel.runtime.adapters import get_adapter

from .errors import BenchError


def compute_marker(attention: torch.nn.Module) -> torch.nn.Module:
    """The submodule that runs exactly once per real computation of an attention module: its query projection."""
    for name in ("to_qkv", "to_q") if getattr(attention, "fused_projections", False) else ("to_q",):
        child = getattr(attention, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    for child in attention.children():
        if any(True for _ in child.parameters()):
            return child
    raise BenchError(f"attention module {type(attention).__name__} has no parameterised submodule to count calls on")


class CallCounter:
    """Counts real block computations and attention computations per kind with forward pre-hooks (read-only)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        adapter = get_adapter(transformer)
        self.counts: Counter[str] = Counter()
        self.handles = []
        for _, block, _ in adapter.iter_blocks(transformer):
            present = [a for a in adapter.attention if isinstance(getattr(block, a.attr, None), torch.nn.Module)]
            if not present:
                raise BenchError(
                    f"block {type(block).__name__} has none of the adapter's attention modules; cannot count its calls"
                )
            for index, attention in enumerate(present):
                marker = compute_marker(getattr(block, attention.attr))
                keys = (f"attention_{attention.kind}", "blocks") if index == 0 else (f"attention_{attention.kind}",)
                self.handles.append(marker.register_forward_pre_hook(self._counter(keys)))

    def _counter(self, keys: tuple[str, ...]) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.counts.update(keys)

        return hook

    def take(self) -> dict[str, int]:
        """Counts since the last call, then start again from zero."""
        counts, self.counts = dict(self.counts), Counter()
        return counts

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def hook_state_bytes(transformer: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages reachable from the diffusers hooks installed on the transformer."""
    seen: set[int] = set()
    storages: set[int] = set()
    total = 0
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            state = {k: v for k, v in vars(hook).items() if k != "fn_ref"}
            total += _reachable_bytes(state, seen, storages, depth=8)
    return total


def _reachable_bytes(value: Any, seen: set[int], storages: set[int], depth: int) -> int:
    """Storage bytes of tensors inside `value` (containers and plain objects; modules and callables are skipped)."""
    if depth < 0 or id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr()
        if key in storages or value.device.type == "meta":
            return 0
        storages.add(key)
        return storage.nbytes()
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        items = list(value)
    elif isinstance(value, torch.nn.Module) or callable(value) or not hasattr(value, "__dict__"):
        return 0
    else:
        items = list(vars(value).values())
    return sum(_reachable_bytes(item, seen, storages, depth - 1) for item in items)


class MemorySampler:
    """Largest `hook_state_bytes` seen after any transformer call while attached."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.peak = 0
        self.handle = transformer.register_forward_hook(self._sample)

    def _sample(self, *_: Any) -> None:
        self.peak = max(self.peak, hook_state_bytes(self.transformer))

    def remove(self) -> None:
        self.handle.remove()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of `fn()`, synchronising CUDA so queued kernels are counted; peak CUDA memory reset first."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def peak_cuda_bytes(device: torch.device) -> int | None:
    """`torch.cuda.max_memory_allocated` since the last reset, or None off CUDA."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


class Lpips:
    """LPIPS from a user-supplied TorchScript module called as `model(x, y)` on [N, 3, H, W] images in [-1, 1].

    The module returns one distance per image (any shape with N leading); the bench averages it over frames. Nothing
    is downloaded: without a weights file there is no LPIPS column.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except (OSError, RuntimeError, ValueError) as exc:
            raise BenchError(
                f"cannot load LPIPS weights {path} as a TorchScript module: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None

    def __call__(self, video: np.ndarray, reference: np.ndarray) -> float:
        x, y = (
            torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
            for v in (video, reference)
        )
        with torch.no_grad():
            return float(torch.as_tensor(self.model(x, y)).float().mean())


def caching_bound(compute_fraction: float, rho: float) -> float:
    """T / (T_c + (T − T_c)·ρ) with T_c = compute_fraction·T: the speedup a run that computes that share of its
    block calls could reach if a skipped block call cost nothing."""
    return 1.0 / (compute_fraction + (1.0 - compute_fraction) * rho)


def non_block_share(per_module: dict[str, int], total: int, root: str, block_ids: list[str]) -> float:
    """ρ: the share of a full run's FLOPs spent outside the transformer blocks."""
    blocks = sum(per_module.get(f"{root}.{block_id}", 0) for block_id in block_ids)
    return max(total - blocks, 0) / total if total else 0.0
