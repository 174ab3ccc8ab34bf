"""Branch and step of transformer calls that a pipeline makes outside any cache context, from their order.

Some pipelines (diffusers' Cosmos family) call the transformer once per CFG branch and step without naming the call:
the cond call, then the uncond call when guidance is on, both inside one scheduler step. Per-branch state keyed by
cache context would mix the two up and count two steps per step. `CallOrderHook` gives each such call the cache
context a naming pipeline would have set: the n-th call within a step is the adapter's `call_order[n]`, and the step
is the scheduler's `step_index` (the scheduler advances it once per step, whichever branches ran). A new run is a new
`timesteps` tensor (every `set_timesteps` makes one).

The hook sits outside every other hook of the transformer, so the step hook, block hooks and probes see an ordinary
named context. A call that already runs in a context (a pipeline that names its calls) is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import CacheContext

from .adapters import ModelAdapter
from .branches import BranchStates
from .errors import AdapterError

CALL_ORDER_HOOK = "dit_call_order"


class CallOrderHook(ModelHook):
    """Runs each unnamed transformer call inside the cache context its position in the scheduler step gives it."""

    def __init__(self, branches: BranchStates, scheduler: Any, order: tuple[str, ...], model: str) -> None:
        super().__init__()
        self.branches, self.scheduler, self.order, self.model = branches, scheduler, order, model
        self._timesteps: Any = None
        self._step = -1
        self._count = 0

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.branches.current_context() is not None:
            return self.fn_ref.original_forward(*args, **kwargs)
        self.branches.set_context(self._next_context())
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.branches.set_context(None)

    def _next_context(self) -> CacheContext:
        """The context of the call now starting: its branch by position within the step, and the step."""
        timesteps = self.scheduler.timesteps
        step = self.scheduler.step_index or 0  # None until the scheduler's first step of a run
        if timesteps is not self._timesteps or step != self._step:
            self._timesteps, self._step, self._count = timesteps, step, 0
        else:
            self._count += 1
        if self._count >= len(self.order):
            raise AdapterError(
                f"the pipeline called {self.model} {self._count + 1} times in step {step}; its adapter names "
                f"{len(self.order)} calls per step ({', '.join(self.order)})"
            )
        return CacheContext(self.order[self._count], step_index=step, num_inference_steps=len(timesteps))


def call_order_hook(
    transformer: torch.nn.Module, adapter: ModelAdapter, branches: BranchStates, scheduler: Any
) -> CallOrderHook | None:
    """A `CallOrderHook` for `transformer` when its adapter names calls by order (`call_order`), else None.

    The caller registers it (as `CALL_ORDER_HOOK`) after every other hook of the transformer: the last hook
    registered runs first. Refused in one line without a scheduler that counts its steps, before anything is
    installed: the transformer alone cannot tell two branches of one step from two steps.
    """
    if not adapter.call_order:
        return None
    if scheduler is None or not hasattr(scheduler, "step_index"):
        raise AdapterError(
            f"{type(transformer).__name__}'s pipelines name no CFG branch, so its steps come from the pipeline's "
            "scheduler: pass the pipeline, not the transformer alone"
        )
    return CallOrderHook(branches, scheduler, adapter.call_order, type(transformer).__name__)
