"""Read-only probes that record per-block, per-step behaviour of a transformer while a pipeline generates.

The recorder installs the runtime's step hook (to know the CFG branch and step of every call), a read-only block
hook per block, and forward hooks on every attention module. Nothing it installs changes a single output value:
block hooks only read inputs and outputs, and attention probes observe the `scaled_dot_product_attention` call
through a `TorchFunctionMode` and then run it unchanged.

Per call it accumulates, as device tensors (no host synchronisation until the prompt ends):
drift of each block's residual and output against the previous step (relative L1, cosine distance), their mean
absolute values, a MoReg motion score of the residual, the relative L1 drift of each block's self-attention output
(UniCP's window signal) and the drift of the model output. On attention steps of
the cond branch it records the attention each token receives, cross-attention to text tokens for sampled queries,
and query/key samples for PCA.

Calibration data flow (which prompts, which pipeline call) lives in `dit_accel.profiler.run`; this module only observes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch.overrides import TorchFunctionMode

from dit_accel.runtime.adapters import AttentionModule, BlockList, ModelAdapter, block_inputs, block_outputs
from dit_accel.runtime.branches import BranchStates, StepState
from dit_accel.runtime.call_order import CALL_ORDER_HOOK, call_order_hook
from dit_accel.runtime.replay import StepHook

PROBE_STEP_HOOK = "dit_profile_step"
PROBE_BLOCK_HOOK = "dit_profile_block"
PROBE_OUTPUT_HOOK = "dit_profile_output"
#: Cache-context names of diffusers' guiders (`ClassifierFreeGuidance` and kin, used by e.g. HunyuanVideo 1.5's
#: pipeline) and the CFG branch each names.
GUIDER_BRANCHES = {"pred_cond": "cond", "pred_uncond": "uncond"}
#: Cache-context names of guidance passes beside CFG (LTX-2's spatio-temporal and modality-isolation guidance):
#: perturbed copies of the cond call. They hold no branch the profile records (their attention and latents are not
#: the cond branch's); the runtime runs the plan's schedule in them as in every call.
EXTRA_GUIDANCE_CONTEXTS = ("uncond_stg", "uncond_modality")
DRIFT_METRICS = (
    "residual_rel_l1",
    "residual_cos",
    "output_rel_l1",
    "output_cos",
    "residual_norm",
    "output_norm",
    "motion",
    "attention_rel_l1",
)
_EPS = 1e-12


@dataclass(frozen=True)
class RecordSettings:
    """What to record and how densely (all stored in the profile so that runs can be compared and merged)."""

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    attention_every: int = 2
    query_samples: int = 64
    cross_tokens: int = 32
    feature_samples: int = 256
    record_attention: bool = True
    record_features: bool = True
    sensitivity_steps: int = 6
    sensitivity_prompts: int = 1
    reuse_lags: int = 8

    @property
    def recorded_lags(self) -> int:
        """Lags of the whole-stack residual kept for reuse costs: runs up to `reuse_lags` and slopes behind them."""
        return 2 * self.reuse_lags + 1 if self.reuse_lags > 0 else 0

    def attention_steps(self) -> list[int]:
        """Steps on which attention maps and features are recorded (every `attention_every`-th, plus the last)."""
        steps = set(range(0, self.num_inference_steps, self.attention_every)) | {self.num_inference_steps - 1}
        return sorted(steps)


class ProbeState(StepState):
    """Per-branch recording state: previous-step tensors and the metric accumulators of the current generation."""

    def __init__(self, num_steps: int, num_blocks: int) -> None:
        super().__init__()
        self.num_steps, self.num_blocks = num_steps, num_blocks
        #: Batch size of this context's transformer calls (says whether a call holds one CFG branch or two).
        self.batch = 0
        self.prev_residual: dict[int, torch.Tensor] = {}
        self.prev_output: dict[int, torch.Tensor] = {}
        self.prev_attention: dict[int, torch.Tensor] = {}
        self.prev_model_output: torch.Tensor | None = None
        self.metrics: dict[str, torch.Tensor] = {}
        self.model_output_rel_l1: torch.Tensor | None = None
        self.stack_input: torch.Tensor | None = None
        #: Whole-stack residuals of the last recorded steps, and ⟨R_a, R_b⟩ per sample (float64) for step pairs.
        self.stack_history: dict[int, torch.Tensor] = {}
        self.stack_dots: dict[tuple[int, int], torch.Tensor] = {}
        self.reuse_gram: torch.Tensor | None = None
        self.stack_output_sq: torch.Tensor | None = None
        self.stack_residual_sq: torch.Tensor | None = None

    def reset(self) -> None:
        self.__init__(self.num_steps, self.num_blocks)

    def write(self, name: str, step: int, block: int, values: torch.Tensor) -> None:
        """Store per-sample values (shape [batch]) of metric `name` at (step, block)."""
        store = self.metrics.get(name)
        if store is None:
            store = self.metrics[name] = torch.full(
                (self.num_steps, self.num_blocks, values.shape[0]), math.nan, device=values.device
            )
        store[step, block] = values


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ⟨a, b⟩ over all but the batch dimension, accumulated in float64."""
    return (a.double() * b.double()).flatten(1).sum(1)


def _token_layout(spec: AttentionModule, queries: int, keys: int, video: int) -> tuple[slice, slice | None] | None:
    """(video token slice, text token slice or None) of one attention call's keys; None if it is not on the grid.

    Self-attention keys are all video tokens, cross-attention keys all text tokens (queries are video), joint
    attention holds both, text first or last as the adapter says.
    """
    if spec.kind == "self":
        return (slice(0, video), None) if queries == video == keys else None
    if spec.kind == "cross":
        return (slice(0, video), slice(0, keys)) if queries == video else None
    if queries != keys or queries < video:
        return None
    text = keys - video
    return (slice(text, keys), slice(0, text)) if spec.text_first else (slice(0, video), slice(video, keys))


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖current − previous‖₁ / ‖previous‖₁."""
    diff = (current.float() - previous.float()).abs().flatten(1).sum(1)
    return diff / previous.float().abs().flatten(1).sum(1).clamp_min(_EPS)


def cosine_distance(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 − cos(current, previous)."""
    return 1.0 - F.cosine_similarity(current.float().flatten(1), previous.float().flatten(1), dim=1, eps=_EPS)


def mean_abs(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().abs().flatten(1).mean(1)


def motion_score(residual: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """AdaCache's MoReg score: normalised difference of the residual between adjacent frames, per sample."""
    if residual.dim() != 3 or residual.shape[1] <= tokens_per_frame:
        return torch.full((residual.shape[0],), math.nan, device=residual.device)
    later, earlier = residual[:, tokens_per_frame:].float(), residual[:, :-tokens_per_frame].float()
    num = (later - earlier).abs().flatten(1).sum(1)
    return num / (later.abs().flatten(1).sum(1) + earlier.abs().flatten(1).sum(1)).clamp_min(_EPS)


class ProbeBranches(BranchStates):
    """Branch states that survive the pipeline's end-of-call reset: the finished generation is kept for `collect`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finished: dict[str, ProbeState] = {}

    def reset(self, *args: Any, **kwargs: Any) -> None:
        states = self.take()
        if states:
            self.finished = states

    def branches(self) -> dict[str, ProbeState]:
        return super().branches() or self.finished


class BlockProbe(ModelHook):
    """Reads one block's input and output hidden states and records drift, norms and motion."""

    def __init__(self, recorder: Recorder, index: int, spec: BlockList) -> None:
        super().__init__()
        self.recorder, self.index, self.spec = recorder, index, spec

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden_in, _ = block_inputs(self.spec, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden_out, _ = block_outputs(self.spec, output)
        state: ProbeState = self.recorder.branches.get_state()
        with torch.no_grad():
            self._record(state, hidden_in, hidden_out)
            if self.index == 0:
                state.stack_input = hidden_in.detach()
            if self.index == state.num_blocks - 1 and state.stack_input is not None:
                self.recorder.observe_stack(state, hidden_out - state.stack_input, hidden_out)
        return output

    def _record(self, state: ProbeState, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        step, block = state.step, self.index
        residual = hidden_out - hidden_in
        previous_residual, previous_output = state.prev_residual.get(block), state.prev_output.get(block)
        if previous_residual is not None and previous_residual.shape == residual.shape:
            state.write("residual_rel_l1", step, block, rel_l1(residual, previous_residual))
            state.write("residual_cos", step, block, cosine_distance(residual, previous_residual))
            state.write("output_rel_l1", step, block, rel_l1(hidden_out, previous_output))
            state.write("output_cos", step, block, cosine_distance(hidden_out, previous_output))
        state.write("residual_norm", step, block, mean_abs(residual))
        state.write("output_norm", step, block, mean_abs(hidden_out))
        state.write("motion", step, block, motion_score(residual, self.recorder.tokens_per_frame))
        state.prev_residual[block] = residual.detach()
        state.prev_output[block] = hidden_out.detach()


class AttentionOutputProbe:
    """Reads one block's self-attention output and records its relative L1 drift against the previous step.

    UniCP places its cache windows by how much attention outputs change between adjacent steps. Relative L1, like
    `residual_rel_l1`, so that the planner can put it in the same units as the block drift. Only the previous step's
    output per block and branch is kept.
    """

    def __init__(self, recorder: Recorder, index: int) -> None:
        self.recorder, self.index = recorder, index

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor):
            return
        state: ProbeState = self.recorder.branches.get_state()
        with torch.no_grad():
            previous = state.prev_attention.get(self.index)
            if previous is not None and previous.shape == hidden.shape:
                state.write("attention_rel_l1", state.step, self.index, rel_l1(hidden, previous))
            state.prev_attention[self.index] = hidden.detach()


class ModelOutputProbe(ModelHook):
    """Reads the transformer's input latent (for the foreground mask) and its output (for output drift)."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.recorder.begin_call(module, args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        prediction = output[0] if isinstance(output, (tuple, list)) else output.sample
        state: ProbeState = self.recorder.branches.get_state()
        with torch.no_grad():
            if state.prev_model_output is not None:
                if state.model_output_rel_l1 is None:
                    state.model_output_rel_l1 = torch.full(
                        (state.num_steps, prediction.shape[0]), math.nan, device=prediction.device
                    )
                state.model_output_rel_l1[state.step] = rel_l1(prediction, state.prev_model_output)
            state.prev_model_output = prediction.detach()
        self.recorder.attention_active = False
        return output


class _AttentionObserver(TorchFunctionMode):
    """Sees the `scaled_dot_product_attention` calls of one attention module and hands q/k to the recorder."""

    def __init__(self, recorder: Recorder, block: int, spec: AttentionModule) -> None:
        super().__init__()
        self.recorder, self.block, self.spec = recorder, block, spec
        #: Attention calls seen since the module's forward began: some processors (Mochi's) call attention once per
        #: batch row, so the n-th call of a module forward is batch row n.
        self.calls = 0

    def __enter__(self) -> _AttentionObserver:
        self.calls = 0
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = kwargs.get("query", args[0] if args else None)
            key = kwargs.get("key", args[1] if len(args) > 1 else None)
            scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
            with torch.no_grad():
                self.recorder.observe_attention(self.block, self.spec, query, key, scale, self.calls)
            self.calls += 1
        return func(*args, **kwargs)


class Recorder:
    """Installs the probes on a transformer and turns one generation's observations into profile arrays.

    A multi-expert pipeline's further experts (`experts`, Wan 2.2's `transformer_2`) get the same probes, sharing
    one state per branch: every step lands in the same arrays at its global index, whichever expert served it, and
    `step_experts` says which one did.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        adapter: ModelAdapter,
        settings: RecordSettings,
        prompt_batch: int = 1,
        experts: Sequence[torch.nn.Module] = (),
        scheduler: Any = None,
    ) -> None:
        """Install probes on `transformer` (and on every further expert in `experts`, which share its blocks);
        `prompt_batch` is the number of prompts per generation (one in `dit-profile`), against which a call's batch
        says whether it holds one CFG branch or two. `scheduler` is the pipeline's: models whose pipelines name no
        CFG branch (`ModelAdapter.call_order`) take their step from it and are refused without it."""
        self.transformer, self.adapter, self.settings = transformer, adapter, settings
        self.experts = (transformer, *experts)
        self.scheduler = scheduler
        self.prompt_batch = prompt_batch
        self.call_batch, self.cond_row = prompt_batch, 0
        self.blocks = adapter.iter_blocks(transformer)
        #: Per step of the last generation, the index in `experts` of the transformer that served it.
        self.step_experts: dict[int, int] = {}
        self.branches = ProbeBranches(ProbeState, (settings.num_inference_steps, len(self.blocks)))
        self.attention_steps = settings.attention_steps()
        self.grid: tuple[int, int, int] | None = None
        self.tokens_per_frame = 1
        self.attention_active = False
        self.progress: Any = None
        self._observers: list[_AttentionObserver] = []
        self._torch_hooks: list[Any] = []
        self._reset_prompt(seed=0)
        namers = [call_order_hook(expert, adapter, self.branches, scheduler) for expert in self.experts]
        self._install()
        for expert, namer in zip(self.experts, namers):
            if namer is not None:
                HookRegistry.check_if_exists_or_initialize(expert).register_hook(namer, CALL_ORDER_HOOK)

    # -- installation -------------------------------------------------------------------------------------------
    def _install(self) -> None:
        for expert in self.experts:
            self._install_on(expert)

    def _install_on(self, transformer: torch.nn.Module) -> None:
        """Probes on one expert; every expert's step hook shares `self.branches`, so steps count globally."""
        for index, (_, block, spec) in enumerate(self.adapter.iter_blocks(transformer)):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                BlockProbe(self, index, spec), PROBE_BLOCK_HOOK
            )
            if self.settings.record_attention or self.settings.record_features:
                for attention in self.adapter.attention:
                    self._watch_attention(getattr(block, attention.attr), index, attention)
            self_attention = self.adapter.self_attention
            if self_attention is not None:
                module = getattr(block, self_attention.attr)
                self._torch_hooks.append(module.register_forward_hook(AttentionOutputProbe(self, index)))
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(ModelOutputProbe(self), PROBE_OUTPUT_HOOK)
        registry.register_hook(StepHook(self.branches, self.settings.num_inference_steps), PROBE_STEP_HOOK)
        registry.invalidate_child_registries_cache()

    def _watch_attention(self, module: torch.nn.Module, block: int, spec: AttentionModule) -> None:
        observer = _AttentionObserver(self, block, spec)

        def enter(*_: Any) -> None:
            if self.attention_active:
                observer.__enter__()
                self._observers.append(observer)

        def leave(*_: Any) -> None:
            if self._observers and self._observers[-1] is observer:
                self._observers.pop().__exit__(None, None, None)

        self._torch_hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self) -> None:
        """Remove every probe; the transformers are left exactly as they were."""
        for expert in self.experts:
            for _, block, _ in self.adapter.iter_blocks(expert):
                HookRegistry.check_if_exists_or_initialize(block).remove_hook(PROBE_BLOCK_HOOK, recurse=False)
            registry = HookRegistry.check_if_exists_or_initialize(expert)
            registry.remove_hook(CALL_ORDER_HOOK, recurse=False)
            registry.remove_hook(PROBE_STEP_HOOK, recurse=False)
            registry.remove_hook(PROBE_OUTPUT_HOOK, recurse=False)
            registry.invalidate_child_registries_cache()
        for hook in self._torch_hooks:
            hook.remove()
        while self._observers:  # an exception inside an attention module skips its `leave` hook
            self._observers.pop().__exit__(None, None, None)

    # -- per call -----------------------------------------------------------------------------------------------
    def begin_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Called before every transformer call (after the step hook): grid, cond-branch bookkeeping."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.grid = self.adapter.token_grid(module.config, hidden, kwargs)
        self.tokens_per_frame = self.grid[1] * self.grid[2]
        state = self.branches.get_state()
        name = self.branches.branch_name()
        state.batch = hidden.shape[0]
        self.call_batch = state.batch
        rows = self._rows(name, state.batch)
        is_cond = "cond" in rows
        self.cond_row = rows.get("cond", 0)
        self.current_step = state.step
        self.step_experts[state.step] = next(i for i, e in enumerate(self.experts) if e is module)
        self.attention_active = is_cond and state.step in self.attention_steps
        if is_cond and self.progress is not None:
            self.progress.update(1)
        if is_cond and state.step == self.settings.num_inference_steps - 1:
            self.final_latent = hidden[self.cond_row].detach().float().cpu().numpy()

    def observe_stack(self, state: ProbeState, residual: torch.Tensor, output: torch.Tensor) -> None:
        """Record the Gram matrix of `R_{s−i} − R_s` (i = 1 … L) for the whole-stack residual R, ‖h_out‖² and ‖R_s‖².

        Only ⟨R_s, R_{s−i}⟩ is new at step s; earlier pairs are kept, so a step costs L + 1 dot products (in float64,
        since the Gram of differences is a small difference of large dot products). The planner derives every reuse
        error from it (planner/reuse_costs.py).
        """
        lags, step = self.settings.recorded_lags, state.step
        if lags == 0:
            return
        if state.reuse_gram is None:
            batch, device = residual.shape[0], residual.device
            state.reuse_gram = torch.full(
                (state.num_steps, lags, lags, batch), math.nan, dtype=torch.float64, device=device
            )
            state.stack_output_sq = torch.full((state.num_steps, batch), math.nan, dtype=torch.float64, device=device)
            state.stack_residual_sq = state.stack_output_sq.clone()
        current = residual.detach()
        state.stack_history = {s: r for s, r in state.stack_history.items() if step - lags <= s < step}
        state.stack_dots = {k: v for k, v in state.stack_dots.items() if min(k) >= step - lags}
        for earlier, past in [(step, current), *state.stack_history.items()]:
            state.stack_dots[(earlier, step)] = _dots(current, past)
        state.stack_output_sq[step] = _dots(output, output)
        here = state.stack_dots[(step, step)]
        state.stack_residual_sq[step] = here
        for i in range(1, lags + 1):
            for k in range(i, lags + 1):
                a, b = step - i, step - k
                if b < 0:
                    break
                value = state.stack_dots[(b, a)] - state.stack_dots[(a, step)] - state.stack_dots[(b, step)] + here
                state.reuse_gram[step, i - 1, k - 1] = state.reuse_gram[step, k - 1, i - 1] = value
        state.stack_history[step] = current

    def observe_attention(
        self,
        block: int,
        spec: AttentionModule,
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float | None,
        call: int = 0,
    ) -> None:
        """Record received attention, cross-attention and q/k samples from one attention call (cond row).

        `call` counts the attention calls of this module forward: a processor that attends one batch row at a time
        (a batch of 1 inside a call of a larger batch) is seen on its `cond_row`-th call.
        """
        if query.shape[0] == self.call_batch:
            row = self.cond_row
        elif query.shape[0] == 1 and call == self.cond_row:
            row = 0
        else:
            return
        q, k = query[row].float(), key[row].float()  # (heads, tokens, dim)
        video = math.prod(self.grid)
        layout = _token_layout(spec, q.shape[1], k.shape[1], video)
        if layout is None:
            return
        video_slice, text_slice = layout
        q_video = q[:, video_slice]
        astep = self.attention_steps.index(self.current_step)
        if self.settings.record_attention:
            index = self._queries(video, q.device)
            scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
            probs = torch.softmax(q_video[:, index] @ k.transpose(-1, -2) * scale, dim=-1).mean(dim=0)  # (query, key)
            if spec.kind != "cross":
                self._buffer("received", self.grid)[astep, block] = (
                    probs[:, video_slice].mean(dim=0).reshape(self.grid).cpu().numpy()
                )
            if text_slice is not None:
                text = probs[:, text_slice][:, : self.settings.cross_tokens]
                self._buffer("cross", tuple(text.shape))[astep, block] = text.cpu().numpy()
        if self.settings.record_features and spec.kind != "cross":
            self._sample_features(block, q_video, k[:, video_slice])

    def _buffer(self, name: str, tail: tuple[int, ...]) -> np.ndarray:
        """The (attention step, block, …) buffer `name` of this prompt, allocated on first use."""
        if getattr(self, name) is None:
            setattr(self, name, np.zeros((len(self.attention_steps), len(self.blocks)) + tuple(tail), np.float32))
        return getattr(self, name)

    def _queries(self, video: int, device: torch.device) -> torch.Tensor:
        if self.query_index is None or self.query_index.numel() != min(self.settings.query_samples, video):
            count = min(self.settings.query_samples, video)
            self.query_index = torch.randperm(video, generator=self.generator)[:count].sort().values
        return self.query_index.to(device)

    def _sample_features(self, block: int, q: torch.Tensor, k: torch.Tensor) -> None:
        per_step = -(-self.settings.feature_samples // len(self.attention_steps))
        index = torch.randperm(q.shape[1], generator=self.generator)[:per_step].to(q.device)
        self.features_q.setdefault(block, []).append(q[:, index].transpose(0, 1).half().cpu())
        self.features_k.setdefault(block, []).append(k[:, index].transpose(0, 1).half().cpu())

    # -- per prompt ---------------------------------------------------------------------------------------------
    def _reset_prompt(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.query_index: torch.Tensor | None = None
        self.received: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.features_q: dict[int, list[torch.Tensor]] = {}
        self.features_k: dict[int, list[torch.Tensor]] = {}
        self.final_latent: np.ndarray | None = None

    def begin_prompt(self, seed: int) -> None:
        """Start recording a new generation; query and feature sampling are seeded by the prompt's seed."""
        self._reset_prompt(seed)
        self.branches.reset()
        self.branches.finished = {}
        self.step_experts = {}

    def collect(self, branch_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Arrays of the generation that just ran, keyed by profile field (see `dit_accel.profiler.schema.FIELDS`),
        for `branch_names` (default: the branches it ran, `observed_branches()`)."""
        branch_names = branch_names or self.observed_branches()
        per_branch = self._per_branch(branch_names)
        arrays = {name: np.stack([per_branch[b][name] for b in branch_names]) for name in DRIFT_METRICS}
        arrays["model_output_rel_l1"] = np.stack([per_branch[b]["model_output_rel_l1"] for b in branch_names])
        if self.settings.recorded_lags:
            arrays["reuse_gram"] = np.stack([per_branch[b]["reuse_gram"] for b in branch_names])
            arrays["stack_output_sq"] = np.stack([per_branch[b]["stack_output_sq"] for b in branch_names])
            arrays["stack_residual_sq"] = np.stack([per_branch[b]["stack_residual_sq"] for b in branch_names])
        if self.settings.record_attention:
            arrays["attention_steps"] = np.asarray(self.attention_steps, np.int32)
            arrays["query_index"] = (
                (self.query_index if self.query_index is not None else torch.zeros(0)).numpy().astype(np.int32)
            )
            if self.received is not None:
                arrays["attention_received"] = self.received
            if self.cross is not None:
                arrays["cross_attention"] = self.cross
        if self.settings.record_features and self.features_q:
            arrays["feature_queries"] = self._stack_features(self.features_q)
            arrays["feature_keys"] = self._stack_features(self.features_k)
        return arrays

    def _stack_features(self, samples: dict[int, list[torch.Tensor]]) -> np.ndarray:
        per_block = [torch.cat(samples[b])[: self.settings.feature_samples] for b in sorted(samples)]
        count = min(t.shape[0] for t in per_block)
        return torch.stack([t[:count] for t in per_block]).numpy()

    def _per_branch(self, branch_names: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
        """Metric arrays (step, block) per branch, from per-context states and batch rows."""
        states = self.branches.branches()
        result: dict[str, dict[str, np.ndarray]] = {}
        for branch in branch_names:
            context, row = self._locate(branch, states)
            state = states[context]
            nan = np.full((self.settings.num_inference_steps, len(self.blocks)), np.nan, np.float32)
            metrics = {
                name: state.metrics[name][..., row].cpu().numpy() if name in state.metrics else nan
                for name in DRIFT_METRICS
            }
            model_out = state.model_output_rel_l1
            metrics["model_output_rel_l1"] = model_out[:, row].cpu().numpy() if model_out is not None else nan[:, 0]
            lags, steps = self.settings.recorded_lags, self.settings.num_inference_steps
            gram, output_sq = state.reuse_gram, state.stack_output_sq
            metrics["reuse_gram"] = (
                gram[..., row].float().cpu().numpy()
                if gram is not None
                else np.full((steps, lags, lags), np.nan, np.float32)
            )
            for name, values in (("stack_output_sq", output_sq), ("stack_residual_sq", state.stack_residual_sq)):
                metrics[name] = (
                    values[:, row].float().cpu().numpy() if values is not None else np.full(steps, np.nan, np.float32)
                )
            result[branch] = metrics
        return result

    def _rows(self, context: str, batch: int) -> dict[str, int]:
        """Batch rows of the branches one transformer call in cache context `context` with `batch` rows holds.

        A context named `cond` or `uncond` (or a diffusers guider's `pred_cond` / `pred_uncond`) holds that branch
        alone; an extra guidance pass (`EXTRA_GUIDANCE_CONTEXTS`) holds none. Any other context (`cond_uncond`, or
        `default` outside a context) holds uncond then cond when its batch is twice the prompt batch (classifier-free
        guidance batched into one call, as diffusers' CogVideoX, LTX-Video, LTX-2 and Mochi pipelines do), else cond
        alone (guidance off, or a guidance-distilled model).
        """
        context = GUIDER_BRANCHES.get(context, context)
        if context in EXTRA_GUIDANCE_CONTEXTS:
            return {}
        if context in ("cond", "uncond"):
            return {context: 0}
        if batch == 2 * self.prompt_batch:
            return {"uncond": 0, "cond": self.prompt_batch}
        return {"cond": 0}

    def observed_branches(self) -> tuple[str, ...]:
        """The CFG branches the last generation really ran, from its cache contexts and batch sizes: `("cond",)` or
        `("cond", "uncond")`. Decided by what the pipeline did, never by the guidance value."""
        seen = {branch for name, state in self.branches.branches().items() for branch in self._rows(name, state.batch)}
        return tuple(b for b in ("cond", "uncond") if b in seen)

    def _locate(self, branch: str, states: dict[str, ProbeState]) -> tuple[str, int]:
        """Which context state and batch row hold `branch`."""
        for name, state in states.items():
            rows = self._rows(name, state.batch)
            if branch in rows:
                return name, rows[branch]
        raise KeyError(f"branch {branch!r} did not run in the last generation (ran: {', '.join(states)})")
