"""Replay a plan on a live pipeline through diffusers' `HookRegistry` / `ModelHook`.

Two kinds of hook are installed:

* a *step hook* on the transformer, which works out the denoising step of every transformer call, per CFG branch
  (from diffusers' `cache_context(name, step_index=…)` when the pipeline provides it, else by counting calls), and
  clears that branch's caches when a new generation starts;
* a *block hook* on every block, which on a compute step runs the block (recording the span's residual when a
  reuse step follows) and on a reuse step returns its input plus the residual cached at the span's last computed
  step. A span of contiguous blocks is cached as one tensor: its first block adds the residual, the others pass
  their input through.

All decisions of a static plan are plain Python lists prepared at apply time, so the hot path never synchronises
with the device. Cache state is kept per CFG branch (diffusers' cache context name); pipelines that batch cond and
uncond into one call keep one cache per batch row, so the halves never mix either.

Example:
    >>> handle = apply_plan(pipe, load_plan("model.plan"))
    >>> video = pipe(prompt="a red circle moves left", num_inference_steps=50).frames
    >>> handle.remove()          # or: with apply_plan(pipe, plan): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .adapters import BlockList, ModelAdapter, config_hash, find_transformer, get_adapter
from .errors import PlanError
from .plan import PRUNE, REUSE, Plan

STEP_HOOK = "dit_plan_step"
BLOCK_HOOK = "dit_plan_block"
DEFAULT_BRANCH = "default"
SUPPORTED_POLICIES = ("static",)


@dataclass(frozen=True)
class SpanSchedule:
    """What one cached span does at every step: `reuse[s]`, and `store[s]` (record the residual after step s)."""

    start: int
    stop: int
    reuse: tuple[bool, ...]
    store: tuple[bool, ...]


class BranchState(BaseState):
    """Per-CFG-branch replay state: current step, call count, span inputs in flight and cached residuals."""

    def __init__(self) -> None:
        self.step = 0
        self.calls = 0
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.residuals: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reset(self) -> None:
        self.__init__()

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.residuals.values() for t in pair if t is not None)


class BranchStates(StateManager):
    """diffusers' `StateManager` that falls back to one default branch when no cache context is set."""

    def get_state(self) -> BranchState:
        name = self._context.name if self._context is not None else DEFAULT_BRANCH
        state = self._state_cache.get(name)
        if state is None:
            state = self._state_cache[name] = self._state_cls(*self._init_args, **self._init_kwargs)
        return state

    def branches(self) -> dict[str, BranchState]:
        return dict(self._state_cache)


class StepHook(ModelHook):
    """Advances the current branch's step on every transformer call and resets the branch's state at step 0.

    Shared by replay and the profiler: both need to know, in every block, which CFG branch and step is running.
    """

    _is_stateful = True

    def __init__(self, branches: BranchStates, num_steps: int) -> None:
        super().__init__()
        self.branches = branches
        self.num_steps = num_steps

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        state = self.branches.get_state()
        context = self.branches._context
        if context is not None and context.step_index is not None:
            if context.num_inference_steps is not None and context.num_inference_steps != self.num_steps:
                raise PlanError(
                    f"the plan was fitted for {self.num_steps} inference steps but the pipeline runs "
                    f"{context.num_inference_steps}; run with num_inference_steps={self.num_steps} or refit the plan"
                )
            step = int(context.step_index)
        else:
            step = state.calls % self.num_steps
        if step == 0:
            state.reset()
        state.step = step
        state.calls += 1
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.branches.reset()
        return module


class BlockHook(ModelHook):
    """Computes or reuses one block according to its span's schedule."""

    def __init__(self, branches: BranchStates, span: SpanSchedule, index: int, spec: BlockList) -> None:
        super().__init__()
        self.branches = branches
        self.span = span
        self.is_first = index == span.start
        self.is_last = index == span.stop - 1
        self.spec = spec

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.branches.get_state()
        step = state.step
        if self.span.reuse[step]:
            return self._reuse(state, *_block_inputs(self.spec, args, kwargs))
        store = self.span.store[step]
        if store and self.is_first:
            state.inputs[self.span.start] = _block_inputs(self.spec, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if store and self.is_last:
            hidden_in, encoder_in = state.inputs.pop(self.span.start)
            hidden_out, encoder_out = _block_outputs(self.spec, output)
            encoder_residual = None if encoder_in is None or encoder_out is None else encoder_out - encoder_in
            state.residuals[self.span.start] = (hidden_out - hidden_in, encoder_residual)
        return output

    def _reuse(self, state: BranchState, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        if self.is_first:
            hidden_residual, encoder_residual = state.residuals[self.span.start]
            hidden = hidden + hidden_residual
            if encoder_residual is not None:
                encoder = encoder + encoder_residual
        return _pack_outputs(self.spec, hidden, encoder)


def _block_inputs(spec: BlockList, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, encoder hidden states) a block was called with, by keyword or position."""
    hidden_name, hidden_pos = spec.hidden_arg
    hidden = kwargs[hidden_name] if hidden_name in kwargs else args[hidden_pos]
    if spec.encoder_index is None:
        return hidden, None
    encoder_name, encoder_pos = spec.encoder_arg
    encoder = kwargs.get(encoder_name) if encoder_name in kwargs else (args[encoder_pos] if len(args) > encoder_pos else None)
    return hidden, encoder


def _block_outputs(spec: BlockList, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.hidden_index is None:
        return output, None
    encoder = output[spec.encoder_index] if spec.encoder_index is not None else None
    return output[spec.hidden_index], encoder


def _pack_outputs(spec: BlockList, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    if spec.hidden_index is None:
        return hidden
    packed: list[Any] = [None] * (max(spec.hidden_index, spec.encoder_index or 0) + 1)
    packed[spec.hidden_index] = hidden
    if spec.encoder_index is not None:
        packed[spec.encoder_index] = encoder
    return tuple(packed)


@dataclass
class PlanHandle:
    """What `apply_plan` returns: removes every hook it installed, reports cache memory; a context manager."""

    transformer: torch.nn.Module
    branches: BranchStates
    blocks: list[torch.nn.Module] = field(default_factory=list)
    active: bool = True

    def remove(self) -> None:
        """Remove every hook the plan installed; the transformer then behaves exactly as before."""
        if not self.active:
            return
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(BLOCK_HOOK, recurse=False)
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.remove_hook(STEP_HOOK, recurse=False)
        registry.invalidate_child_registries_cache()
        self.branches.reset()
        self.active = False

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by cached residuals, per CFG branch (cache context name)."""
        return {name: state.cache_bytes() for name, state in self.branches.branches().items()}

    def __enter__(self) -> "PlanHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def check_plan_matches(plan: Plan, transformer: torch.nn.Module, adapter: ModelAdapter, force: bool = False) -> None:
    """Refuse a plan fitted on another model; the message names the field that differs.

    `force=True` (unsafe: the plan's schedule was measured on another model) skips the class and config checks;
    block ids must match in any case, since the plan addresses blocks by id.
    """
    fingerprint = plan.model
    if not force:
        actual_class = type(transformer).__name__
        if fingerprint.transformer_class != actual_class:
            raise PlanError(f"plan is for transformer class {fingerprint.transformer_class}, model is {actual_class} (use force=True to apply anyway, unsafe)")
        actual_hash = config_hash(transformer.config)
        if fingerprint.config_hash != actual_hash:
            raise PlanError(f"plan's config_hash {fingerprint.config_hash[:12]}… differs from the model's {actual_hash[:12]}… (another size or variant; use force=True to apply anyway, unsafe)")
    block_ids = tuple(adapter.block_ids(transformer))
    if len(block_ids) != len(fingerprint.block_ids):
        raise PlanError(f"plan has {len(fingerprint.block_ids)} blocks, model has {len(block_ids)}")
    if block_ids != fingerprint.block_ids:
        differ = next(i for i, (a, b) in enumerate(zip(block_ids, fingerprint.block_ids)) if a != b)
        raise PlanError(f"plan's block_ids differ from the model's at position {differ}: {fingerprint.block_ids[differ]} vs {block_ids[differ]}")
    if plan.policy.get("kind") not in SUPPORTED_POLICIES:
        raise PlanError(f"plan policy '{plan.policy.get('kind')}' is not supported by this runtime (supported: {', '.join(SUPPORTED_POLICIES)})")
    if (plan.actions == PRUNE).any():
        raise PlanError("plan uses 'prune' actions, which this runtime version cannot replay yet; refit without pruning")


def span_schedules(plan: Plan) -> list[SpanSchedule]:
    """For every block, the schedule of the span it is cached in (blocks of one span share one object)."""
    schedules: dict[tuple[int, int], SpanSchedule] = {}
    result = []
    for start, stop in plan.span_of_block():
        if (start, stop) not in schedules:
            reuse = tuple(bool(a == REUSE) for a in plan.actions[start])
            store = tuple(not reuse[s] and s + 1 < len(reuse) and reuse[s + 1] for s in range(len(reuse)))
            schedules[(start, stop)] = SpanSchedule(start, stop, reuse, store)
        result.append(schedules[(start, stop)])
    return result


def apply_plan(pipe_or_transformer: Any, plan: Plan, *, force: bool = False) -> PlanHandle:
    """Install `plan` on a pipeline's transformer (or on a transformer) and return a handle that removes it.

    The plan is checked against the model before any hook is installed. Example:

        >>> with apply_plan(pipe, load_plan("wan.plan")):
        ...     frames = pipe(prompt_embeds=embeds, num_inference_steps=50).frames
    """
    transformer = find_transformer(pipe_or_transformer)
    adapter = get_adapter(transformer)
    check_plan_matches(plan, transformer, adapter, force=force)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(STEP_HOOK) is not None:
        raise PlanError("a plan is already applied to this transformer; call .remove() on its handle first")
    branches = BranchStates(BranchState)
    handle = PlanHandle(transformer, branches)
    schedules = span_schedules(plan)
    for index, (_, block, spec) in enumerate(adapter.iter_blocks(transformer)):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(BlockHook(branches, schedules[index], index, spec), BLOCK_HOOK)
        handle.blocks.append(block)
    registry.register_hook(StepHook(branches, plan.num_inference_steps), STEP_HOOK)
    registry.invalidate_child_registries_cache()
    return handle
