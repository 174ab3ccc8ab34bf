"""Replay a plan on a live pipeline through diffusers' `HookRegistry` / `ModelHook`.

Hooks installed:

* a *step hook* on the transformer, which works out the denoising step of every transformer call, per CFG branch
  (from diffusers' `cache_context(name, step_index=…)` when the pipeline provides it, else by counting calls),
  picks the step table for the run length (remapping the plan when the run has another step count), asks an
  adaptive policy for its decision, and clears that branch's caches when a new generation starts;
* a *block hook* on every block, which on a compute step runs the block (recording the span's residual when a
  reuse step or a blended prune step follows), on a prune step runs it with PCA-projected attention scores
  (blending with the cached output by the plan's DWS weight), and on a reuse step returns its input plus the
  residual cached at the span's last computed step (policy `reuse: extrapolate` / `slope`: that residual moved one
  step / a fitted amount along its slope since the span's previous computed step; `reuse: scale`: the hidden-state
  residual times the plan's `reuse_gain` for the step and run position, the encoder stream's as cached). A span of
  contiguous blocks is cached as one tensor:
  its first block adds the residual, the others pass their input through;
* an *attention hook* on the self-attention of blocks that have prune steps (see `dit_accel.runtime.pruning`);
* with policy `cache_level: attention` (UniCP's caching), an *attention-cache hook* on every block's self-attention
  (the adapter's non-cross attention module): there a reuse cell runs the block, but its self-attention returns the
  output cached at the block's last computed step for that CFG branch (cross-attention and feed-forward still run);
  a prune step's blend (DWS) mixes the pruned and the cached attention outputs. The block hooks then replay the plan
  with every reuse cell computed (`block_view`).

All decisions of a static plan are plain Python tuples prepared at apply time, so the hot path never synchronises
with the device; adaptive policies read one scalar per computed step (see `dit_accel.runtime.adaptive`). Cache state is
kept per CFG branch (diffusers' cache context name); pipelines that batch cond and uncond into one call keep one cache
per batch row, so the halves never mix either.

Under `torch.compile`, every per-call decision (step, run length, step table, adaptive policy, extrapolation slopes)
is taken by code wrapped in `torch.compiler.disable`, as diffusers' own cache hooks do. What the compiled graph
reads is the call's `StepActions` value, which Dynamo guards by value: one graph per distinct action set of the
plan, never one per step, and no recompilation from one generation to the next (a `scale` plan's gains differ
from one reuse step to the next, so there its reuse steps get a graph each).

Example:
    >>> handle = apply_plan(pipe, load_plan("model.plan"))
    >>> video = pipe(prompt="a red circle moves left", num_inference_steps=50).frames
    >>> handle.remove()          # or: with apply_plan(pipe, plan): ...
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from .adapters import (
    AttentionModule,
    BlockList,
    ModelAdapter,
    WeightsMismatchWarning,
    block_inputs,
    block_outputs,
    config_hash,
    find_experts,
    get_adapter,
    pack_block_outputs,
    weights_differ,
)
from .adaptive import POLICIES, AdaptivePolicy
from .branches import BranchStates, StepState
from .call_order import CALL_ORDER_HOOK, call_order_hook
from .errors import PlanError
from .plan import COMPUTE, PRUNE, REUSE, Plan, cache_level
from .pruning import ProjectedAttention, load_bases
from .replay_table import CompiledSchedule, StepActions, StepTable, remap_actions, source_steps

STEP_HOOK = "dit_plan_step"
BLOCK_HOOK = "dit_plan_block"
ATTENTION_HOOK = "dit_plan_attention"
ATTENTION_CACHE_HOOK = "dit_plan_attention_cache"
SUPPORTED_POLICIES = ("static", *POLICIES)
#: A span's residual slot before its first store: (hidden, encoder) both absent.
EMPTY: tuple[None, None] = (None, None)


class BranchState(StepState):
    """Per-CFG-branch replay state: current step, table and actions, span inputs in flight and cached residuals."""

    def __init__(self) -> None:
        super().__init__()
        self.table: StepTable | None = None
        #: This call's actions, set by the step hook outside any compiled graph.
        self.actions: StepActions | None = None
        self.tokens_per_frame = 1
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.residuals: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: Per span, the slope of its residual per step between the last two stores (slope modes only).
        self.slopes: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: Per span, the step its last residual was stored at (host-side bookkeeping for extrapolation slopes).
        self.stored_at: dict[int, int] = {}
        #: DWS weights given as tensors per block (ONNX export feeds them as graph inputs); else the table's floats.
        self.blend_inputs: dict[int, torch.Tensor] = {}
        #: Index of the expert whose residuals the caches hold (None before this generation's first call).
        self.expert: int | None = None
        #: Attention-level plans: this call's self-attention actions, and per block its cached attention output.
        self.attention: AttentionActions | None = None
        self.attention_cache: dict[int, Any] = {}

    def reset(self) -> None:
        self.__init__()

    def prepare(self, spans: int) -> None:
        """Give every span its (empty) residual slots, so the state has the same structure at every step.

        Compiled graphs guard on the keys of the dicts they write to; slots present from the first step on keep a
        store step's graph valid for every later store step.
        """
        for span in range(spans):
            self.residuals.setdefault(span, EMPTY)
            self.slopes.setdefault(span, EMPTY)

    def enter_expert(self, expert: int) -> bool:
        """Make `expert` the owner of the caches; True when it was not (its first call of the generation), and then
        every cache is emptied: an expert never reads another expert's residual."""
        if self.expert == expert:
            return False
        self.expert = expert
        self.inputs, self.residuals, self.slopes, self.stored_at = {}, {}, {}, {}
        self.attention_cache = {}
        return True

    def current_actions(self) -> StepActions:
        """This call's actions: the step hook's, else (block hooks driven without one, as the ONNX exporter does)
        the table's at the current step."""
        return self.actions if self.actions is not None else self.table.at(self.step)

    def cache_bytes(self) -> int:
        """Bytes held by this branch's cached residuals and attention outputs."""
        pairs = [*self.residuals.values(), *self.slopes.values(), *self.attention_cache.values()]
        tensors = [t for pair in pairs for t in (pair if isinstance(pair, tuple) else (pair,))]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class CurrentBranch:
    """The state of the CFG branch whose transformer call is under way, pinned by the step hook for the block hooks.

    Looking the state up by the cache context's name inside a compiled graph would guard on that name and compile
    every graph once per branch; through the pin, cond and uncond (states of the same structure) share graphs.
    Without a step hook (the ONNX exporter drives the block hooks itself) the state is looked up by name.
    """

    def __init__(self, branches: BranchStates) -> None:
        self.branches = branches
        self.state: BranchState | None = None

    def get_state(self) -> BranchState:
        """The pinned state, else the current context's."""
        return self.state if self.state is not None else self.branches.get_state()


class StepHook(ModelHook):
    """Works out the branch, run length and step of every transformer call; resets the branch at step 0.

    Shared by replay and the profiler: both need to know, in every block, which CFG branch and step is running.
    The step comes from diffusers' cache context (`step_index`) when the pipeline passes it, else from counting
    calls; the run length from the context (`num_inference_steps`), else from the pipeline's scheduler, else the
    plan's own step count. With a schedule, it also sets the call's `StepActions` on the branch state.

    A multi-expert pipeline gets one step hook per expert, all sharing one `BranchStates`: calls are counted per
    branch across the experts, so the step is the global one whichever expert serves it. At an expert's first call
    of a generation its caches start empty and every span computes (a plan never reuses there; a remapped run
    length might otherwise ask to).

    Everything here runs outside `torch.compile`'s graphs (`torch.compiler.disable`): it reads Python integers that
    change every step, which a graph would guard on and recompile for.
    """

    _is_stateful = True

    def __init__(
        self,
        branches: BranchStates,
        num_steps: int,
        scheduler: Any = None,
        schedule: CompiledSchedule | None = None,
        policy: AdaptivePolicy | None = None,
        adapter: ModelAdapter | None = None,
        current: CurrentBranch | None = None,
        expert: int = 0,
        attention: AttentionSchedule | None = None,
    ) -> None:
        super().__init__()
        self.branches, self.num_steps, self.scheduler = branches, num_steps, scheduler
        self.schedule, self.policy, self.adapter, self.current = schedule, policy, adapter, current
        self.expert, self.attention = expert, attention

    def _run_length(self, context: Any) -> int:
        if context is not None and context.num_inference_steps:
            return int(context.num_inference_steps)
        timesteps = getattr(self.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None and len(timesteps) else self.num_steps

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        state = self.branches.get_state()
        context = self.branches.current_context()
        steps = self._run_length(context)
        step = (
            int(context.step_index) if context is not None and context.step_index is not None else state.calls % steps
        )
        if step == 0:
            state.reset()
        state.step, state.calls = step, state.calls + 1
        state.branch = self.branches.branch_name()
        if self.current is not None:
            self.current.state = state
        if self.schedule is None:
            return args, kwargs
        entered = state.enter_expert(self.expert)
        state.prepare(len(self.schedule.spans))
        state.table = self.schedule.table(steps)
        actions = state.table.at(step)
        if self.policy is not None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            grid = self.adapter.token_grid(module.config, hidden, kwargs)
            state.tokens_per_frame = grid[1] * grid[2]
            if self.policy.begin_step(state.branch, step, steps):
                actions = actions.reusing_all()
        if entered and any(actions.reuse):
            actions = _computing_all(actions)
        if self.attention is not None:
            attention = self.attention.table(steps)[step]
            state.attention = attention.computing_all() if entered else attention
        if self.schedule.extrapolate:
            actions = actions.with_slopes(step, state.stored_at)
        state.actions = actions
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.policy is not None:
            self._end_step()
        return output

    @torch.compiler.disable
    def _end_step(self) -> None:
        """Let the adaptive policy decide from what it observed, outside compiled graphs (it reads the host)."""
        state = self.branches.get_state()
        self.policy.end_step(state.branch, state.step, state.table.steps)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.branches.reset()
        if self.current is not None:
            self.current.state = None
        if self.policy is not None:
            self.policy.reset()
        return module


def _computing_all(actions: StepActions) -> StepActions:
    """`actions` with every span computed, and stored where it would have reused (a later step may reuse it)."""
    spans = len(actions.reuse)
    store = tuple(s or r for s, r in zip(actions.store, actions.reuse, strict=True))
    return replace(actions, reuse=(False,) * spans, store=store, slope=(None,) * spans, advance=(0.0,) * spans)


@dataclass(frozen=True)
class AttentionActions:
    """What every block's self-attention does at one call of an attention-level plan: per block, `reuse` (return the
    cached output), `store` (cache the output after computing) and `blend` (DWS weight of a pruned output against the
    cached one; 1: none)."""

    reuse: tuple[bool, ...]
    store: tuple[bool, ...]
    blend: tuple[float, ...]

    def computing_all(self) -> AttentionActions:
        """These actions with every block computed, and stored where it would have reused (an expert's first call)."""
        store = tuple(s or r for s, r in zip(self.store, self.reuse, strict=True))
        return AttentionActions((False,) * len(self.reuse), store, self.blend)


class AttentionSchedule:
    """An attention-level plan's self-attention decisions, per run length (remapped like the block tables)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        blend = plan.arrays.get("dws_weight")
        self._blend = np.ones(plan.actions.shape, np.float32) if blend is None else np.asarray(blend, np.float32)
        self.table = lru_cache(maxsize=8)(self._table)

    def _table(self, steps: int) -> tuple[AttentionActions, ...]:
        """Per step of a run of `steps`: a block's attention output is stored after a computed step when the next
        step reuses it or blends a pruned output with it."""
        actions = remap_actions(self.plan.actions, steps)
        blend = self._blend[:, source_steps(self.plan.num_inference_steps, steps)]
        reuse = actions == REUSE
        needs = reuse | ((actions == PRUNE) & (blend < 1.0))
        store = ~reuse & np.concatenate([needs[:, 1:], np.zeros((len(actions), 1), bool)], axis=1)
        return tuple(
            AttentionActions(
                tuple(bool(r) for r in reuse[:, s]),
                tuple(bool(v) for v in store[:, s]),
                tuple(float(w) for w in blend[:, s]),
            )
            for s in range(steps)
        )


def block_view(plan: Plan) -> Plan:
    """What the block hooks replay of an attention-level plan: every reuse cell computed, no block-level blend (the
    attention-cache hooks reuse and blend the self-attention outputs instead)."""
    arrays = {name: array for name, array in plan.arrays.items() if name != "dws_weight"}
    return plan.with_changes(actions=np.where(plan.actions == REUSE, COMPUTE, plan.actions), arrays=arrays)


class AttentionCacheHook(ModelHook):
    """On a block's self-attention (attention-level plans): returns, computes, blends and stores its output according
    to the call's `AttentionActions`; registered after any prune hook, so a pruned call is projected inside it."""

    def __init__(self, current: CurrentBranch, block: int) -> None:
        super().__init__()
        self.current, self.block = current, block

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.current.get_state()
        actions = state.attention
        if actions.reuse[self.block]:
            return state.attention_cache[self.block]
        output = self.fn_ref.original_forward(*args, **kwargs)
        cached = state.attention_cache.get(self.block)
        if actions.blend[self.block] < 1.0 and cached is not None:
            output = _lerp_outputs(cached, output, actions.blend[self.block])
        if actions.store[self.block]:
            state.attention_cache[self.block] = output
        return output


def _lerp_outputs(cached: Any, fresh: Any, weight: float) -> Any:
    """weight·fresh + (1 − weight)·cached, for an attention output or a tuple of them (joint attention)."""
    if isinstance(fresh, torch.Tensor):
        return torch.lerp(cached, fresh, weight)
    return tuple(f if f is None else torch.lerp(c, f, weight) for c, f in zip(cached, fresh, strict=True))


class PruneSwitch:
    """Turns a block's PCA-projected attention on for the duration of one prune-step call."""

    def __init__(self, basis: torch.Tensor) -> None:
        self.basis = basis
        self.active = False


class AttentionPruneHook(ModelHook):
    """On an attention module: while its block's switch is on, attention scores use the PCA basis."""

    def __init__(self, switch: PruneSwitch) -> None:
        super().__init__()
        self.switch = switch

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.switch.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        with ProjectedAttention(self.switch.basis):
            return self.fn_ref.original_forward(*args, **kwargs)


class BlockHook(ModelHook):
    """Computes, prunes or reuses one block according to the step table and the adaptive policy."""

    def __init__(
        self,
        current: CurrentBranch,
        block: int,
        span: tuple[int, int],
        span_index: int,
        spec: BlockList,
        policy: AdaptivePolicy | None,
        switch: PruneSwitch | None,
        extrapolate: bool = False,
    ) -> None:
        super().__init__()
        self.current, self.block, self.span_index, self.spec = current, block, span_index, spec
        self.extrapolate = extrapolate
        self.is_first, self.is_last = block == span[0], block == span[1] - 1
        self.policy = policy if policy is not None and block in policy.observed_blocks() else None
        self.switch = switch

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.current.get_state()
        actions, span = state.current_actions(), self.span_index
        if actions.reuse[span]:
            return self._reuse(state, *block_inputs(self.spec, args, kwargs))
        store = actions.store[span]
        pruned = self.switch is not None and actions.prune[self.block]
        observe = self.policy is not None
        inputs = block_inputs(self.spec, args, kwargs) if (store and self.is_first) or pruned or observe else None
        if store and self.is_first:
            state.inputs[span] = inputs
        output = self._forward(args, kwargs, pruned)
        blended = pruned and actions.blend[self.block] < 1.0
        if blended and state.residuals.get(span, EMPTY)[0] is not None:
            weight = state.blend_inputs.get(self.block, actions.blend[self.block])
            output = self._blend(state, inputs, output, weight)
        if observe:
            self._observe(state, inputs[0], block_outputs(self.spec, output)[0])
        if store and self.is_last:
            hidden_in, encoder_in = state.inputs.pop(span)
            hidden_out, encoder_out = block_outputs(self.spec, output)
            encoder_residual = None if encoder_in is None or encoder_out is None else encoder_out - encoder_in
            residual = (hidden_out - hidden_in, encoder_residual)
            state.residuals[span] = self._cache_value(state, actions.slope[span], residual)
        return output

    @torch.compiler.disable
    def _observe(self, state: BranchState, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        """Hand the block's input and output to the adaptive policy, outside compiled graphs (it keys on the step)."""
        self.policy.observe(state.branch, self.block, hidden_in, hidden_out, state.step, state.tokens_per_frame)

    def _cache_value(
        self, state: BranchState, scale: float | None, residual: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store the residual; in slope modes also its slope per step since the span's previous stored residual.

        `scale` is one over the steps between the two (`None` when there is no previous one: no slope yet). Where
        the cache is used, `_cached` moves the residual `advance` steps along the slope.
        """
        if self.extrapolate:
            hidden_before, encoder_before = state.residuals.get(self.span_index, EMPTY)
            if scale is None or hidden_before is None:
                state.slopes[self.span_index] = EMPTY
            else:
                encoder = residual[1]
                encoder_slope = (
                    None if encoder is None or encoder_before is None else (encoder - encoder_before) * scale
                )
                state.slopes[self.span_index] = ((residual[0] - hidden_before) * scale, encoder_slope)
        return residual

    def _cached(self, state: BranchState, advance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The span's cached residual moved `advance` steps along its slope (as stored when `advance` is 0)."""
        hidden, encoder = state.residuals[self.span_index]
        hidden_slope, encoder_slope = state.slopes.get(self.span_index, EMPTY)
        if advance == 0.0 or hidden_slope is None:
            return hidden, encoder
        hidden = hidden + hidden_slope if advance == 1.0 else hidden + hidden_slope * advance
        if encoder is not None and encoder_slope is not None:
            encoder = encoder + encoder_slope if advance == 1.0 else encoder + encoder_slope * advance
        return hidden, encoder

    def _forward(self, args: tuple, kwargs: dict, pruned: bool) -> Any:
        if not pruned:
            return self.fn_ref.original_forward(*args, **kwargs)
        self.switch.active = True
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.switch.active = False

    def _blend(self, state: BranchState, inputs: tuple, output: Any, weight: float | torch.Tensor) -> Any:
        """DWS: weight·pruned + (1 − weight)·cached, for the hidden (and encoder) states."""
        hidden_in, encoder_in = inputs
        hidden_residual, encoder_residual = self._cached(state, state.current_actions().advance[self.span_index])
        hidden_out, encoder_out = block_outputs(self.spec, output)
        hidden = torch.lerp(hidden_in + hidden_residual, hidden_out, weight)
        if encoder_residual is not None and encoder_out is not None:
            encoder_out = torch.lerp(encoder_in + encoder_residual, encoder_out, weight)
        return pack_block_outputs(self.spec, hidden, encoder_out)

    def _reuse(self, state: BranchState, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        if self.is_first:
            actions = state.current_actions()
            hidden_residual, encoder_residual = self._cached(state, actions.advance[self.span_index])
            gain = actions.gain[self.span_index]
            hidden = hidden + (hidden_residual if gain == 1.0 else hidden_residual * gain)
            if encoder_residual is not None:
                encoder = encoder + encoder_residual
        return pack_block_outputs(self.spec, hidden, encoder)


@dataclass
class PlanHandle:
    """What `apply_plan` returns: removes every hook it installed, reports cache memory; a context manager.

    `transformer` is the (first) expert; `experts` the further experts of a multi-expert pipeline, hooked too.
    """

    transformer: torch.nn.Module
    branches: BranchStates
    policy: AdaptivePolicy | None = None
    hooked: list[tuple[torch.nn.Module, str]] = field(default_factory=list)
    active: bool = True
    current: CurrentBranch = field(init=False)
    experts: tuple[torch.nn.Module, ...] = ()

    def __post_init__(self) -> None:
        self.current = CurrentBranch(self.branches)

    def remove(self) -> None:
        """Remove every hook the plan installed; the transformer then behaves exactly as before."""
        if not self.active:
            return
        for module, name in reversed(self.hooked):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
        for transformer in (self.transformer, *self.experts):
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        self.branches.reset()
        self.current.state = None
        self.active = False

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by cached residuals, per CFG branch (cache context name)."""
        return {name: state.cache_bytes() for name, state in self.branches.branches().items()}

    def reused_steps(self) -> list[int]:
        """Steps of the last generation an adaptive policy reused the whole stack at (empty for static plans)."""
        return self.policy.reused_steps() if self.policy is not None else []

    def __enter__(self) -> PlanHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def check_plan_matches(plan: Plan, transformer: torch.nn.Module, adapter: ModelAdapter, force: bool = False) -> None:
    """Refuse a plan fitted on another model; the message names the field that differs.

    `force=True` (unsafe: the plan's schedule was measured on another model) skips the class and config checks;
    block ids must match in any case, since the plan addresses blocks by id. A multi-expert plan is refused here
    (one transformer cannot replay it); `apply_plan` checks each expert of a pipeline.
    """
    if plan.model.experts:
        raise PlanError(
            f"plan covers experts {', '.join(plan.model.expert_names)} and cannot be applied to one transformer; "
            "pass the pipeline to apply_plan"
        )
    _check_first_expert(plan, transformer, adapter, force)


def _check_first_expert(plan: Plan, transformer: torch.nn.Module, adapter: ModelAdapter, force: bool) -> None:
    """`check_plan_matches` for the first expert (the fields at the top of the plan's fingerprint)."""
    fingerprint = plan.model
    if not force:
        actual_class = type(transformer).__name__
        if fingerprint.transformer_class != actual_class:
            raise PlanError(
                f"plan is for transformer class {fingerprint.transformer_class}, model is {actual_class} (use "
                "force=True to apply anyway, unsafe)"
            )
        actual_hash = config_hash(transformer.config)
        if fingerprint.config_hash != actual_hash:
            raise PlanError(
                f"plan's config_hash {fingerprint.config_hash[:12]}… differs from the model's {actual_hash[:12]}… "
                "(another size or variant; use force=True to apply anyway, unsafe)"
            )
    block_ids = tuple(adapter.block_ids(transformer))
    if len(block_ids) != len(fingerprint.block_ids):
        raise PlanError(f"plan has {len(fingerprint.block_ids)} blocks, model has {len(block_ids)}")
    if block_ids != fingerprint.block_ids:
        differ = next(i for i, (a, b) in enumerate(zip(block_ids, fingerprint.block_ids)) if a != b)
        raise PlanError(
            f"plan's block_ids differ from the model's at position {differ}: {fingerprint.block_ids[differ]} vs "
            f"{block_ids[differ]}"
        )
    if plan.policy.get("kind") not in SUPPORTED_POLICIES:
        raise PlanError(
            f"plan policy '{plan.policy.get('kind')}' is not supported by this runtime (supported: "
            f"{', '.join(SUPPORTED_POLICIES)})"
        )


def check_experts_match(plan: Plan, experts: list[tuple[str, torch.nn.Module]], force: bool = False) -> None:
    """Refuse a plan whose experts are not the pipeline's: another set of expert names (a single-transformer plan on
    a two-expert pipeline, or the reverse), or a further expert of another class or config (unless `force`); and a
    multi-expert plan with an adaptive policy. The first expert is `check_plan_matches`'s; the message names the
    expert that differs.
    """
    wanted, found = plan.model.expert_names, tuple(name for name, _ in experts)
    if wanted != found:
        missing = [name for name in found if name not in wanted]
        hint = (
            f"{', '.join(missing)} would run unaccelerated; fit a plan on a profile of this pipeline (dit-profile "
            "records every expert)"
            if missing
            else "apply it to the pipeline it was fitted on (the pipeline, not one of its transformers)"
        )
        raise PlanError(f"plan covers {', '.join(wanted)}, the pipeline has {', '.join(found)}: {hint}")
    if plan.model.experts and plan.policy.get("kind") in POLICIES:
        raise PlanError(
            f"plan policy '{plan.policy['kind']}' decides reuse online without knowing where the experts switch; "
            "fit a static plan (--method auto or unicp) for a multi-expert pipeline"
        )
    if force:
        return
    for recorded, (name, module) in zip(plan.model.experts, experts[1:]):
        actual_class, actual_hash = type(module).__name__, config_hash(module.config)
        if recorded.transformer_class != actual_class:
            raise PlanError(
                f"plan's {name} is a {recorded.transformer_class}, the pipeline's {name} a {actual_class} (use "
                "force=True to apply anyway, unsafe)"
            )
        if recorded.config_hash != actual_hash:
            raise PlanError(
                f"plan's {name} config_hash {recorded.config_hash[:12]}… differs from the pipeline's "
                f"{actual_hash[:12]}… (another size or variant; use force=True to apply anyway, unsafe)"
            )


def check_expert_weights(plan: Plan, experts: list[tuple[str, torch.nn.Module]], strict: bool = False) -> None:
    """`check_weights` for every expert of a multi-expert plan, by name.

    An expert holding the weights the plan recorded for another expert (swapped or duplicated experts) is refused
    even without `strict`: its schedule was measured on the other expert's steps.
    """
    recorded = {"transformer": plan.model.weights, **{e.name: e.weights for e in plan.model.experts}}
    for name, module in experts:
        if recorded[name] is None or not weights_differ(recorded[name], module):
            continue
        twin = next(
            (
                other
                for other, w in recorded.items()
                if other != name and w is not None and weights_differ(w, module) == 0
            ),
            None,
        )
        if twin is not None:
            raise PlanError(
                f"the pipeline's {name} holds the weights the plan recorded for {twin} (experts swapped or loaded "
                f"from another checkpoint); fit a plan on a profile of this pipeline"
            )
        _weights_mismatch(recorded[name], module, strict, f"{name}: ")


def _pruned_attention(adapter: ModelAdapter) -> AttentionModule:
    """The attention module whose scores pruning projects and whose output attention-level plans cache: the block's
    self- or joint attention."""
    attention = adapter.self_attention
    if attention is None:
        raise PlanError(f"adapter {adapter.name} names no self-attention module to prune or cache")
    return attention


def check_weights(plan: Plan, transformer: torch.nn.Module, strict: bool = False) -> None:
    """Warn (`WeightsMismatchWarning`), or with `strict` refuse, when the model's sampled weights differ from those
    the plan was fitted on; plans without a weight sample pass."""
    if plan.model.weights is not None:
        _weights_mismatch(plan.model.weights, transformer, strict)


def _weights_mismatch(
    recorded: tuple[float, ...], transformer: torch.nn.Module, strict: bool, prefix: str = ""
) -> None:
    """Warn, or with `strict` refuse, when `transformer`'s sampled weights differ from `recorded`."""
    differ = weights_differ(recorded, transformer)
    if not differ:
        return
    message = (
        f"{prefix}{differ} of {len(recorded)} sampled weights differ from those the plan was fitted on (a fused "
        "LoRA, a fine-tune or another checkpoint?); the schedule may not suit them: measure it with dit-plan validate"
    )
    if strict:
        raise PlanError(message)
    warnings.warn(message, WeightsMismatchWarning, stacklevel=4)


def apply_plan(
    pipe_or_transformer: Any, plan: Plan, *, force: bool = False, strict_weights: bool = False
) -> PlanHandle:
    """Install `plan` on a pipeline's transformer (or on a transformer) and return a handle that removes it.

    The plan is checked against the model (and compiled: spans, policy, PCA bases) before any hook is installed.
    Weights that differ from the plan's sample (`check_weights`) warn, or with `strict_weights=True` refuse;
    `force=True` skips that check with the others.
    Passing the pipeline rather than the transformer lets step remapping read the run length from its scheduler
    when the pipeline does not pass it in the cache context. On a two-expert pipeline (Wan 2.2) the plan must cover
    both experts (`check_experts_match`); it is installed on each, following the global step (see `StepHook`).
    Example:

        >>> with apply_plan(pipe, load_plan("wan.plan")):
        ...     frames = pipe(prompt_embeds=embeds, num_inference_steps=50).frames
    """
    experts = find_experts(pipe_or_transformer)
    transformer = experts[0][1]
    adapter = get_adapter(transformer)
    check_experts_match(plan, experts, force=force)
    _check_first_expert(plan, transformer, adapter, force)
    if not force:
        check_expert_weights(plan, experts, strict=strict_weights)
    for name, module in experts:
        if HookRegistry.check_if_exists_or_initialize(module).get_hook(STEP_HOOK) is not None:
            raise PlanError(f"a plan is already applied to {name}; call .remove() on its handle first")
    kind = plan.policy["kind"]
    policy = POLICIES[kind](plan.policy, plan.num_blocks) if kind in POLICIES else None
    attention = AttentionSchedule(plan) if cache_level(plan) == "attention" else None
    blocks = plan if attention is None else block_view(plan)
    schedule = CompiledSchedule(blocks, adaptive=policy is not None, breaks=adapter.span_breaks(transformer))
    handle = PlanHandle(transformer, BranchStates(BranchState), policy, experts=tuple(m for _, m in experts[1:]))
    scheduler = getattr(pipe_or_transformer, "scheduler", None)
    namers = [call_order_hook(module, adapter, handle.branches, scheduler) for _, module in experts]
    for index, ((_, module), namer) in enumerate(zip(experts, namers)):
        install_block_hooks(handle, adapter, blocks, schedule, module)
        if attention is not None:
            install_attention_cache_hooks(handle, adapter, module)
        step_hook = StepHook(
            handle.branches,
            plan.num_inference_steps,
            scheduler,
            schedule,
            policy,
            adapter,
            handle.current,
            index,
            attention,
        )
        _register(handle, module, step_hook, STEP_HOOK)
        if namer is not None:
            _register(handle, module, namer, CALL_ORDER_HOOK)
        HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()
    return handle


def install_block_hooks(
    handle: PlanHandle,
    adapter: ModelAdapter,
    plan: Plan,
    schedule: CompiledSchedule,
    transformer: torch.nn.Module | None = None,
) -> None:
    """Install every block's hook (and the attention-prune hook of blocks with prune steps) on `transformer`
    (default `handle.transformer`; `apply_plan` passes each expert in turn).

    Shared by `apply_plan` and the ONNX exporter, which traces these same hooks with a one-step table.
    """
    transformer = handle.transformer if transformer is None else transformer
    parameter = next(transformer.parameters())
    prune_blocks = [b for b in range(plan.num_blocks) if (plan.actions[b] == PRUNE).any()]
    bases = load_bases(plan.arrays, plan.model.block_ids, prune_blocks, parameter.device, parameter.dtype)
    attention = _pruned_attention(adapter)
    for index, (_, block, spec) in enumerate(adapter.iter_blocks(transformer)):
        switch = PruneSwitch(bases[index]) if index in bases else None
        if switch is not None:
            _register(handle, getattr(block, attention.attr), AttentionPruneHook(switch), ATTENTION_HOOK)
        span_index = schedule.span_of_block[index]
        hook = BlockHook(
            handle.current,
            index,
            schedule.spans[span_index],
            span_index,
            spec,
            handle.policy,
            switch,
            schedule.extrapolate,
        )
        _register(handle, block, hook, BLOCK_HOOK)


def install_attention_cache_hooks(handle: PlanHandle, adapter: ModelAdapter, transformer: torch.nn.Module) -> None:
    """Install the attention-cache hook on every block's self-attention of `transformer` (after its prune hook)."""
    attention = _pruned_attention(adapter)
    for index, (_, block, _) in enumerate(adapter.iter_blocks(transformer)):
        _register(
            handle, getattr(block, attention.attr), AttentionCacheHook(handle.current, index), ATTENTION_CACHE_HOOK
        )


def _register(handle: PlanHandle, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    handle.hooked.append((module, name))
