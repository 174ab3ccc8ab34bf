"""Fitting a plan: the five method presets over one shared cost/error model, and the plan they produce.

* `profilingdit` — background blocks (labels) cached as spans: warm-up, then a fixed refresh interval (or, with
  --refresh decreasing, one shrinking linearly); foreground blocks always computed. Budget knob: the longest interval.
* `adacache` — adaptive codebook policy on a probe block's residual distance, MoReg on. Budget knob: codebook scale.
* `bwcache` — adaptive similarity-indicator policy. Budget knob: the indicator quantile used as threshold.
* `unicp` — EDCW windows per block and step, PCAS prune steps, DWS blend weights, reuse cells caching the
  self-attention output (`--cache-level attention`) or the whole block's residual. Budget knob: the window threshold.
* `auto` — on profiles with measured reuse costs (whole stack, no pruning): the exact least-cost schedule from
  dynamic programming on measured per-step reuse errors, for a plain hold and a calibrated slope, robust over prompts
  (`search.py`, `reuse_costs.py`); with a closed loop, the candidate that measures best on the calibration prompts
  (`closed_loop.py`). Otherwise: greedy budget solver over compute / reuse (/ prune with --prune) per unit and step,
  foreground errors weighted up. Units default to the whole stack: one synchronised schedule, as AdaCache found
  per-layer schedules unstable and `validate` measures staggered per-block schedules far below their prediction.

Every preset with a budget keeps the least-error setting that meets it (see `solver.py`); without one it uses the
paper's defaults (`auto`: target speedup 2, or the most reachable below that). The same profiles and options always give
the same plan bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from dit_accel.runtime.plan import CACHE_LEVELS, COMPUTE, REUSE, Plan
from dit_accel.runtime.replay_table import REUSE_MODES

from .adaptive_fit import (
    adacache_policy,
    adjacent_distances,
    bwcache_policy,
    choose_probe_block,
    indicator_blocks,
    moreg_settings,
    simulate,
    simulate_adacache,
    simulate_bwcache,
    unprotected,
)
from .attention_level import AttentionLevelPredictor, self_attention_flops
from .closed_loop import FAIL_RATIO, ClosedLoop, tail_error
from .drift import build_predictor, normalised_drift, sensitivity_weights
from .errors import PlannerError
from .labels import BlockLabels, fit_labels
from .pca import PcaBases, fit_pca_bases, pruned_block_flops
from .predict import Predictor, step_weights
from .profiles import ProfileSet, load_profiles
from .refine import DEFAULT_ROUNDS, Refinement, evenly_spaced, refine
from .reuse_costs import REUSE_COST_FIELDS, SCALED_HOLD_FIELD, ReuseCosts, reuse_costs
from .search import ROBUST, SearchResult, cell_costs, search, walk_cost
from .shapes import (
    blending_blocks,
    corrector_fronts,
    edcw_actions,
    group_spans,
    interval_row,
    longest_reuse_run,
    merge_windows,
    protected_steps,
)
from .solver import Budget, Candidate, block_units, choose_candidate, greedy_schedule

PLANNER_VERSION = "0.1.0"
#: Names of the error model recorded in `predicted`: drift only, or drift with measured step sensitivity.
ERROR_MODEL = "stale-drift-v1"
ERROR_MODEL_SENSITIVITY = "stale-drift-v1+step-sensitivity"
ERROR_MODEL_MEASURED = "measured-reuse-v2"
#: The schedules `auto` searches on measured reuse costs: (reuse mode, robust aggregate over prompts); the scaled
#: hold only where the profile recorded the residual norms it needs.
MEASURED_CANDIDATES = (
    ("slope", "max"),
    ("slope", "mean"),
    ("hold", "max"),
    ("hold", "mean"),
    ("scale", "max"),
    ("scale", "mean"),
)
METHODS = ("profilingdit", "adacache", "bwcache", "unicp", "auto")
LABEL_FIELDS = ("attention_received", "foreground")
FEATURE_FIELDS = ("feature_queries", "feature_keys")
AUTO_DEFAULT_SPEEDUP = 2.0
#: ProfilingDiT refresh intervals: the released fixed interval, or the ablation's decreasing one.
REFRESH_SCHEDULES = ("fixed", "decreasing")
#: AdaCache probe choices: the paper's mid-depth block (its code: block 13 of 28), or the best-correlated one.
PROBES = ("mid", "correlated")
#: How far above its target speedup a preset's plan may land before the plan notes that it overshoots.
TARGET_SLACK = 0.10
#: UniCP's default cache level (docs/methods.md has the measurement behind it).
UNICP_CACHE_LEVEL = "block"


@dataclass(frozen=True)
class FitOptions:
    """Every planner parameter (recorded in the plan's provenance). `None` means the method's default."""

    method: str = "auto"
    target_speedup: float | None = None
    max_error: float | None = None
    pca_variance: float = 0.95
    warmup: int | None = None
    protect_last: int | None = None
    max_reuse: int | None = None
    foreground_weight: float = 2.0
    label_quantile: float = 0.8
    label_rule: str = "threshold"
    label_threshold: float | None = None
    moreg: bool = True
    prune: bool = False
    granularity: str = "stack"
    reuse: str | None = None
    front_blocks: int | None = None
    prune_time_ratio: float | None = None
    refresh: str | None = None
    probe: str | None = None
    max_cache_tensors: int | None = None
    refine_rounds: int | None = None
    cache_level: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FitContext:
    """What every method gets: the merged profiles, resolved options, labels, PCA bases and the predictor."""

    profiles: ProfileSet
    options: FitOptions
    budget: Budget
    warmup: int
    protect_last: int
    max_reuse: int
    labels: BlockLabels | None
    pca: PcaBases | None
    predictor: Predictor
    sensitivity_measured: bool = False

    @property
    def steps(self) -> int:
        return self.profiles.num_steps

    @property
    def blocks(self) -> int:
        return self.profiles.num_blocks

    @property
    def protected(self) -> np.ndarray:
        return protected_steps(self.steps, self.warmup, self.protect_last) | self.profiles.expert_starts


@dataclass(frozen=True)
class MethodResult:
    """A method's schedule (blocks × steps), policy, prediction, extra arrays and the knob values it chose."""

    actions: np.ndarray
    policy: dict[str, Any]
    predicted: dict[str, Any]
    chosen: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    #: The cost/error model the plan stores, when not the context's (attention-level UniCP).
    predictor: Predictor | None = None


def fit_plan(profile_paths: Sequence[str], options: FitOptions, closed_loop: ClosedLoop | None = None) -> Plan:
    """Fit a plan from one or more profile files of the same model.

    Args:
        profile_paths: HDF5 profiles written by `dit-profile` for one model and one set of settings.
        options: the method and its parameters.
        closed_loop: the model and calibration prompts to measure `auto`'s candidates on (None: choose by the
            error model alone).

    Raises:
        PlannerError: the profiles do not support the request (missing fields, impossible budget, failed closed loop).
    """
    return fit_profiles(load_profiles(profile_paths), options, closed_loop)


def fit_profiles(profiles: ProfileSet, options: FitOptions, closed_loop: ClosedLoop | None = None) -> Plan:
    """Fit a plan from already opened profiles (see `fit_plan`)."""
    context = build_context(profiles, options)
    if options.method == "auto" and measured_search_applies(context):
        result = fit_auto_measured(context, closed_loop)
    elif options.reuse == "slope" or options.front_blocks is not None:
        flag = "--reuse slope" if options.reuse == "slope" else "--front-blocks"
        raise PlannerError(
            f"{flag} needs --method auto, a profile with measured reuse costs (dit-profile --reuse-lags) and a "
            "whole-stack schedule (no --prune, --granularity stack)"
        )
    else:
        result = METHOD_FITTERS[options.method](context)
    return assemble_plan(context, result)


def build_context(profiles: ProfileSet, options: FitOptions) -> FitContext:
    """Check the options against the profile, resolve defaults, fit labels and PCA bases, build the predictor."""
    if options.method not in METHODS:
        raise PlannerError(f"unknown method {options.method!r} (known: {', '.join(METHODS)})")
    if not options.foreground_weight > 0:
        raise PlannerError(f"--foreground-weight must be positive, got {options.foreground_weight}")
    if options.cache_level is not None and options.method != "unicp":
        raise PlannerError(f"--cache-level applies to method unicp, not {options.method}")
    if options.max_cache_tensors is not None and (options.method != "unicp" or options.max_cache_tensors < 1):
        raise PlannerError(
            f"--max-cache-tensors applies to method unicp and must be >= 1, got {options.max_cache_tensors} for "
            f"{options.method}"
        )
    if options.reuse not in (None, *REUSE_MODES) or (
        options.reuse in ("extrapolate", "slope") and options.method != "auto"
    ):
        raise PlannerError(
            f"--reuse must be one of {', '.join(REUSE_MODES)}, and 'extrapolate' / 'slope' are for --method auto "
            f"only (the presets follow their papers), got {options.reuse!r} for {options.method}"
        )
    if profiles.expert_starts.any() and options.method in ("profilingdit", "adacache", "bwcache"):
        raise PlannerError(
            f"method {options.method} places reuse by rules that do not know where the pipeline switches experts "
            f"({', '.join(profiles.header.fingerprint.expert_names)}); use --method auto or unicp"
        )
    budget = Budget(options.target_speedup, options.max_error)
    steps = profiles.num_steps
    sensitivity = profiles.stack_recorded("step_sensitivity")
    measured = sensitivity is not None
    warmup, protect_last, max_reuse = _resolve_steps(options, steps, measured)
    labels = _labels(profiles, options)
    pca = _pca(profiles, options)
    weights = (
        np.ones(profiles.num_blocks) if labels is None else np.where(~labels.background, options.foreground_weight, 1.0)
    )
    predictor = build_predictor(
        profiles,
        weights,
        None if pca is None else pca.distortion,
        None if pca is None else _pruned_flops(profiles, pca, options.prune_time_ratio),
        sensitivity,
    )
    return FitContext(profiles, options, budget, warmup, protect_last, max_reuse, labels, pca, predictor, measured)


def _resolve_steps(options: FitOptions, steps: int, sensitivity_measured: bool) -> tuple[int, int, int]:
    """(warm-up, protected last steps, longest reuse run): the method's defaults unless given.

    The longest reuse run defaults to steps/6, or steps/5 when the profile measured step sensitivity: then the error
    model knows which steps are cheap to reuse (docs/planner.md has the measurement behind this default).
    """
    defaults = {"profilingdit": (round(0.12 * steps), round(0.04 * steps)), "adacache": (1, 2)}
    warmup_default, last_default = defaults.get(options.method, (round(0.1 * steps), round(0.04 * steps)))
    warmup = max(1, warmup_default) if options.warmup is None else options.warmup
    protect_last = max(1, last_default) if options.protect_last is None else options.protect_last
    max_reuse = (
        max(1, round(steps / (5 if sensitivity_measured else 6))) if options.max_reuse is None else options.max_reuse
    )
    if warmup < 1:
        raise PlannerError(f"--warmup must be at least 1 (step 0 has nothing cached), got {warmup}")
    if protect_last < 0 or max_reuse < 1:
        raise PlannerError(f"--protect-last must be >= 0 and --max-reuse >= 1, got {protect_last} and {max_reuse}")
    return min(warmup, steps), min(protect_last, steps), max_reuse


def _labels(profiles: ProfileSet, options: FitOptions) -> BlockLabels | None:
    """ProfilingDiT labels when the profile has attention maps and masks (required by profilingdit)."""
    if options.method == "profilingdit":
        profiles.require(LABEL_FIELDS, "method profilingdit (block labels)")
    elif not profiles.has(*LABEL_FIELDS):
        return None
    return fit_labels(
        profiles.stack("attention_received"),
        profiles.stack("foreground"),
        options.label_quantile,
        options.label_rule,
        options.label_threshold,
    )


def _pca(profiles: ProfileSet, options: FitOptions) -> PcaBases | None:
    """PCAS bases for plans that prune: unicp always, auto with --prune (the runtime replays prune steps later)."""
    if options.method == "unicp" or (options.method == "auto" and options.prune):
        profiles.require(FEATURE_FIELDS, f"pruning (method {options.method})")
        return fit_pca_bases(profiles.stack("feature_queries"), profiles.stack("feature_keys"), options.pca_variance)
    if options.prune:
        raise PlannerError(f"--prune applies to methods unicp and auto, not {options.method}")
    return None


def _pruned_flops(profiles: ProfileSet, pca: PcaBases, time_ratio: float | None) -> np.ndarray:
    """Cost of a pruned call per block: at the kernel rank, or scaled by the measured pruned/full time ratio."""
    frames, height, width = profiles.header.grid
    heads, head_dim = pca.bases[0].shape[:2]
    flops = profiles.header.block_flops.astype(np.float64)
    return pruned_block_flops(flops, frames * height * width, head_dim, pca.ranks, heads, time_ratio)


def _static_candidate(context: FitContext, actions: np.ndarray, params: dict[str, Any]) -> Candidate:
    return Candidate(params, context.predictor.speedup(actions), context.predictor.error(actions), actions)


def _pick(
    context: FitContext, values: Sequence[Any], default: Any, build: Callable[[Any], Candidate], method: str
) -> Candidate:
    """The candidate for the default knob value, or the best of the sweep under the budget.

    A target speedup that no knob value lands within `TARGET_SLACK` of is met by the least-error candidate above it,
    and the plan says so (`target_note`: the nearest speedups the preset reaches below and above the target).
    """
    if not context.budget.given:
        return build(default)
    candidates = [build(v) for v in values]
    chosen = choose_candidate(candidates, context.budget, method)
    target = context.budget.target_speedup
    if target is None or chosen.speedup <= target * (1 + TARGET_SLACK):
        return chosen
    below = max((c.speedup for c in candidates if c.speedup < target), default=1.0)
    note = (
        f"{method} has no setting within {TARGET_SLACK:.0%} of {target:g}x on this profile: nearest {below:.2f}x "
        f"below, {chosen.speedup:.2f}x above (kept)"
    )
    return replace(chosen, params={**chosen.params, "target_note": note})


def fit_profilingdit(context: FitContext) -> MethodResult:
    """ProfilingDiT: background blocks cached with warm-up and a refresh interval, foreground blocks always computed.

    The paper's released Wan defaults refresh every 6 of 50 steps (`refresh` "fixed"); "decreasing" is the ablation's
    interval shrinking from 12 to 2 of 50 steps (its released step list 6, 18, 26, 32, 38, 42, 46, 48). Both scale
    with the step count; under a budget the longest interval is the knob.
    """
    background = context.labels.background
    if not background.any() and (context.budget.target_speedup or 1.0) > 1.0:
        raise PlannerError(
            "method profilingdit caches background blocks only, and the profile labels every block foreground"
        )
    refresh = context.options.refresh or "fixed"
    if refresh not in REFRESH_SCHEDULES:
        raise PlannerError(f"--refresh must be one of {', '.join(REFRESH_SCHEDULES)}, got {refresh!r}")
    steps = context.steps

    def build(longest: int) -> Candidate:
        shortest = longest if refresh == "fixed" else max(1, round(longest / 6))
        actions = np.zeros((context.blocks, steps), dtype=np.uint8)
        actions[background] = interval_row(steps, context.warmup, context.protect_last, longest, shortest)
        return _static_candidate(context, actions, {"refresh_longest": longest, "refresh_shortest": shortest})

    default = max(2, round((6 if refresh == "fixed" else 12) * steps / 50))
    chosen = _pick(context, range(2, max(3, steps - context.warmup + 1)), default, build, "profilingdit")
    params = {**chosen.params, "refresh": refresh, "foreground_blocks": [int(b) for b in np.flatnonzero(~background)]}
    if background.all():
        params["labels_note"] = _no_foreground_note(context.labels)
    return MethodResult(chosen.result, {"kind": "static"}, context.predictor.summary(chosen.result), params)


def _no_foreground_note(labels: BlockLabels) -> str:
    """What a plan says when no block is foreground-focused: the preset then caches the whole stack periodically."""
    return (
        f"no block is foreground-focused on this profile (scores {min(labels.scores):.3f} to {max(labels.scores):.3f}, "
        f"threshold {labels.threshold:.3f}, chance {labels.chance:.3f}): every block is cached"
    )


def fit_adacache(context: FitContext) -> MethodResult:
    """AdaCache (+MoReg): codebook thresholds from quantiles of the profiled probe distances, simulated per prompt."""
    fields = ("residual_rel_l1", "motion") if context.options.moreg else ("residual_rel_l1",)
    context.profiles.require(
        fields, "method adacache" + (" with MoReg (or pass --no-moreg)" if context.options.moreg else "")
    )
    steps = _reusable_steps(context)
    rel_l1 = _replays(context.profiles, "residual_rel_l1")
    stack = normalised_drift(
        rel_l1, _replays(context.profiles, "residual_norm"), _replays(context.profiles, "output_norm")
    )[0].sum(axis=-1)
    probe = _adacache_probe(context, rel_l1, stack, steps)
    motion = _replays(context.profiles, "motion")[..., probe] if context.options.moreg else None
    moreg = moreg_settings(motion, steps)
    distances = adjacent_distances(rel_l1[..., probe], motion, moreg, steps)

    def build(scale: float) -> Candidate:
        policy = adacache_policy(distances, scale, context.steps, probe, moreg, context.warmup, context.protect_last)
        run = simulate(simulate_adacache(policy, rel_l1[..., probe], motion), context.predictor)
        return Candidate({"codebook_scale": scale}, run.speedup, run.error, (policy, run))

    chosen = _pick(context, [float(s) for s in 2.0 ** np.linspace(-4, 4, 33)], 1.0, build, "adacache")
    return _adaptive_result(context, *chosen.result, chosen.params)


def _adacache_probe(context: FitContext, rel_l1: np.ndarray, stack: np.ndarray, steps: np.ndarray) -> int:
    """The probe block: mid-depth as in AdaCache's code (13 of 28 blocks), or with --probe correlated the block whose
    drift tracks the whole stack's best."""
    choice = context.options.probe or "mid"
    if choice not in PROBES:
        raise PlannerError(f"--probe must be one of {', '.join(PROBES)}, got {choice!r}")
    if choice == "correlated":
        return choose_probe_block(rel_l1, stack, steps)
    return min(context.blocks - 1, round(13 / 28 * context.blocks))


def fit_bwcache(context: FitContext) -> MethodResult:
    """BWCache: threshold at a quantile of the profiled similarity indicator, simulated per prompt.

    Reuse runs last R = round(0.1·T) steps, cut to half of the steps remaining after the trigger (the paper's end
    protection, which replaces a protected tail: none unless --protect-last is given).
    """
    context.profiles.require(("output_rel_l1",), "method bwcache")
    protect_last = context.protect_last if context.options.protect_last is not None else 0
    steps = _reusable_steps(context, protect_last)
    blocks = indicator_blocks(context.blocks)
    indicator = _replays(context.profiles, "output_rel_l1")[..., blocks].mean(axis=-1)
    reuse_steps = max(1, round(0.1 * context.steps))

    def build(quantile: float) -> Candidate:
        policy = bwcache_policy(
            indicator[:, steps].ravel(), quantile, blocks, reuse_steps, context.warmup, protect_last
        )
        run = simulate(simulate_bwcache(policy, indicator), context.predictor)
        return Candidate({"indicator_quantile": quantile}, run.speedup, run.error, (policy, run))

    chosen = _pick(context, [float(q) for q in np.linspace(0.0, 1.0, 21)], 0.5, build, "bwcache")
    return _adaptive_result(context, *chosen.result, chosen.params)


def _reusable_steps(context: FitContext, protect_last: int | None = None) -> np.ndarray:
    protect_last = context.protect_last if protect_last is None else protect_last
    steps = unprotected(context.steps, context.warmup, protect_last)
    if not steps.any():
        raise PlannerError(
            f"no step is left to reuse: {context.steps} steps, warm-up {context.warmup}, {protect_last} "
            "protected final steps"
        )
    return steps


def _replays(profiles: ProfileSet, name: str) -> np.ndarray:
    """Field [prompt, branch, step, block] of the deciding branch as [prompt, step, block]; 0 drift at step 0.

    The runtime takes one decision per step for all CFG branches, measured on the first branch to run (cond).
    """
    branches = profiles.header.branches
    array = profiles.stack(name).astype(np.float64)[:, branches.index("cond") if "cond" in branches else 0]
    if name.endswith("rel_l1"):
        array[:, 0] = 0.0
    if not np.all(np.isfinite(array)):
        hint = {
            "motion": " (videos of one frame have no motion; pass --no-moreg)",
            "residual_rel_l1": " after step 0",
            "output_rel_l1": " after step 0",
        }
        raise PlannerError(f"profile field {name} holds non-finite values{hint.get(name, '')}")
    return array


def _adaptive_result(context: FitContext, policy: dict[str, Any], run: Any, chosen: dict[str, Any]) -> MethodResult:
    actions = np.zeros((context.blocks, context.steps), dtype=np.uint8)
    return MethodResult(
        actions, policy, run.predicted(), chosen, {"expected_compute": run.expected_compute(context.blocks)}
    )


def fit_unicp(context: FitContext) -> MethodResult:
    """UniCP: EDCW windows under an error threshold, PCAS prune steps and DWS blend weights.

    Windows follow the self-attention outputs' drift between adjacent steps (the paper's signal, `attention_rel_l1`).
    At cache level "attention" (the paper's) a reuse cell skips only the block's self-attention, and the prediction
    scores that (`attention_level.py`); at "block" it skips the whole block, and the prediction scores the whole-block
    reuse the runtime then replays.
    """
    level = _unicp_cache_level(context)
    predictor = context.predictor
    signal, signal_params = _edcw_signal(context)
    windows = replace(predictor, drift=signal)
    scored = predictor if level == "block" else AttentionLevelPredictor.of(predictor, signal, _attention_flops(context))
    cells = (signal * predictor.step_weight)[:, ~context.protected]
    positive = cells[cells > 0]

    limit = context.options.max_cache_tensors

    def build(threshold: float) -> Candidate:
        actions = edcw_actions(windows, threshold, context.protected, context.max_reuse, prune=True)
        if limit is not None:
            actions = merge_windows(actions, limit, predictor.block_flops)
        return Candidate({"window_threshold": threshold}, scored.speedup(actions), scored.error(actions), actions)

    if positive.size:
        top = float(predictor.step_weight.max() * signal.sum(axis=1).max() * predictor.block_weight.max())
        values = [0.0, *(float(v) for v in np.geomspace(positive.min() / 2, max(top, positive.min()), 40))]
        default = float(2 * np.median(positive))
    else:
        values, default = [0.0], 0.0
    chosen = _pick(context, values, default, build, "unicp")
    params = {
        **chosen.params,
        **signal_params,
        "cache_level": level,
        "cache_tensors_per_branch": _cache_tensors(scored, chosen.result, level),
    }
    policy: dict[str, Any] = {"kind": "static"}
    if level == "attention":
        policy["cache_level"] = "attention"
        share = float(scored.attention_flops.sum() / scored.block_flops.sum())
        params["cache_level_note"] = (
            f"reuse cells run the block and skip only its self-attention ({share:.0%} of the block FLOPs): the "
            "predicted speedup counts self-attention FLOPs, and every block call runs (block-call speedup 1.0)"
        )
    return MethodResult(chosen.result, policy, scored.summary(chosen.result), params, predictor=scored)


def _unicp_cache_level(context: FitContext) -> str:
    """The cache level asked for (UniCP's default when none); --max-cache-tensors bounds block-level spans only."""
    level = context.options.cache_level or UNICP_CACHE_LEVEL
    if level not in CACHE_LEVELS:
        raise PlannerError(f"--cache-level must be one of {', '.join(CACHE_LEVELS)}, got {level!r}")
    if level == "attention" and context.options.max_cache_tensors is not None:
        raise PlannerError(
            "--max-cache-tensors merges block-level cache spans; with --cache-level attention every reusing block "
            "keeps its own attention output (use --cache-level block to bound them)"
        )
    return level


def _attention_flops(context: FitContext) -> np.ndarray:
    """Estimated self-attention FLOPs per block, from the token grid and the PCA bases' heads × head dim."""
    heads, head_dim = context.pca.bases[0].shape[:2]
    header = context.profiles.header
    return self_attention_flops(header.block_flops, int(np.prod(header.grid)), heads, head_dim)


def _cache_tensors(predictor: Predictor, actions: np.ndarray, level: str = "block") -> int:
    """Tensors the runtime keeps per CFG branch for a static schedule. Block level: one residual per span, one per
    other block that reads its cache (reuse, or a pruned step blended with the cache); attention level: one attention
    output per block that reads its cache."""
    alone = blending_blocks(actions, predictor.dws_weights(actions))
    reads = np.any(actions == REUSE, axis=1) | alone
    if level == "attention":
        return int(np.sum(reads))
    spans = group_spans(actions, alone)
    in_span = np.zeros(len(actions), dtype=bool)
    for start, stop in spans:
        in_span[start:stop] = True
    return len(spans) + int(np.sum(reads & ~in_span))


def _edcw_signal(context: FitContext) -> tuple[np.ndarray, dict[str, Any]]:
    """UniCP's window signal [blocks, steps] in the predictor's drift units, and what the plan says about it.

    attention_rel_l1 · ‖r_{s−1}‖ / ‖h_out,s‖: the block residual's share of the stack output, moved by the relative
    change of the block's attention output. Profiles without the field (or with a block that has no self-attention)
    fall back to the residual drift, and say so.
    """
    profiles = context.profiles
    if profiles.has("attention_rel_l1"):
        norms = (profiles.stack(name).astype(np.float64) for name in ("residual_norm", "output_norm"))
        with np.errstate(divide="ignore", invalid="ignore"):
            drift = normalised_drift(profiles.stack("attention_rel_l1").astype(np.float64), *norms)[0]
        if np.all(np.isfinite(drift[..., 1:, :])):
            return drift.mean(axis=(0, 1)).T.astype(np.float32).astype(np.float64), {
                "window_signal": "attention_rel_l1"
            }
        reason = "holds non-finite values after step 0 (a block without self-attention)"
    else:
        reason = "is not in the profile (recorded since attention-output drift was added; re-profile)"
    note = f"profile field attention_rel_l1 {reason}: EDCW windows follow the whole-block residual drift instead"
    return context.predictor.drift, {"window_signal": "residual_rel_l1", "window_signal_note": note}


def fit_auto(context: FitContext) -> MethodResult:
    """Greedy least-error schedule under the budget (pruning where it pays, with --prune).

    Without a budget it aims at a 2x FLOP speedup, or the most the protected steps and reuse limit allow if less.
    """
    budget = context.budget if context.budget.given else Budget(target_speedup=AUTO_DEFAULT_SPEEDUP)
    labels = context.labels.labels if context.labels else ("unlabelled",) * context.blocks
    units = block_units(context.blocks, context.options.granularity, labels)
    actions = greedy_schedule(
        context.predictor,
        context.protected,
        budget,
        context.max_reuse,
        context.pca is not None,
        units,
        strict=context.budget.given,
    )
    policy = {"kind": "static", "reuse": context.options.reuse or "extrapolate"}
    return MethodResult(actions, policy, context.predictor.summary(actions), {"budget": budget.to_json()})


def measured_search_applies(context: FitContext) -> bool:
    """Whether `auto` can search on measured reuse costs: the profile has them and the schedule is whole-stack."""
    options = context.options
    return (
        context.profiles.has(*REUSE_COST_FIELDS)
        and options.granularity == "stack"
        and not options.prune
        and options.reuse in (None, "hold", "slope", "scale")
    )


def fit_auto_measured(context: FitContext, closed_loop: ClosedLoop | None) -> MethodResult:
    """`auto` on measured reuse costs: exact search per reuse mode and robust aggregate, then the closed loop.

    Without a budget it aims at a 2x FLOP speedup. Only step 0 (nothing cached) and the steps the user forces with
    --warmup / --protect-last always compute. With a closed loop, candidates also include evenly spaced schedules and
    corrector schedules (the first `front` blocks computed at every step, the rest of the stack reused as one span:
    cache-dit's DBCache Fn), priced by their FLOPs and by the closed loop's measurement (`options.front_blocks` fixes
    the front instead), and the best is refined by measured local search (`refine.py`).
    """
    options = context.options
    budget = context.budget if context.budget.given else Budget(target_speedup=AUTO_DEFAULT_SPEEDUP)
    costs = measured_costs(context)
    weights = measured_weights(context, costs)
    forced = context.profiles.expert_starts.copy()
    forced[: options.warmup or 0] = True
    if options.protect_last:
        forced[context.steps - options.protect_last :] = True
    available = ("hold", "slope", "scale") if costs.scaled is not None else ("hold", "slope")
    modes = [(m, r) for m, r in MEASURED_CANDIDATES if options.reuse in (None, m) and m in available]
    if not modes:
        raise PlannerError("--reuse scale needs profile field stack_residual_sq, which this profile lacks; re-profile")
    fronts = _fronts(context, closed_loop)
    candidates = _measured_candidates(context, costs, weights, forced, budget, modes, fronts[0])
    best, record = candidates[0], None
    if closed_loop is not None:
        best, record = _measured_pick(context, candidates, costs, weights, forced, budget, modes, fronts, closed_loop)
    policy, arrays = reuse_policy(best["mode"], costs)
    predicted = {
        **context.predictor.summary(best["actions"]),
        "error": best["error"],
        "error_model": ERROR_MODEL_MEASURED,
    }
    if record is not None:
        predicted["closed_loop"] = record
    chosen = {
        "budget": budget.to_json(),
        "reuse": best["mode"],
        "objective": best["robust"],
        "max_run": costs.max_run,
        "front_blocks": best["front"],
    }
    return MethodResult(best["actions"], policy, predicted, chosen, arrays)


def reuse_policy(mode: str, costs: ReuseCosts) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A static plan's policy and extra arrays for a reuse mode: the fitted slope scales (`slope`) or the scaled
    hold's gains per step and run position (`scale`, plan array `reuse_gain`)."""
    policy: dict[str, Any] = {"kind": "static", "reuse": mode}
    if mode == "slope":
        policy["slope_scale"] = [float(b) for b in costs.beta]
    if mode == "scale":
        return policy, {"reuse_gain": costs.gain.astype(np.float32)}
    return policy, {}


def _measured_pick(
    context: FitContext,
    candidates: list[dict[str, Any]],
    costs: ReuseCosts,
    weights: np.ndarray,
    forced: np.ndarray,
    budget: Budget,
    modes: Sequence[tuple[str, str]],
    fronts: tuple[int, ...],
    closed_loop: ClosedLoop,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The closed loop's pick among the searched `candidates`, and what the plan records of it.

    Adds the evenly spaced starts, measures everything, tries the corrector depths with the best plain candidate's
    mode, refines the best by measured local search, and keeps the best candidate that passes its closed loop.
    """
    start = closed_loop.generations
    candidates = candidates + _even_candidates(context, costs, weights, forced, candidates, modes)
    _measure(context, candidates, closed_loop)
    best = _least_measured(candidates)
    for front in fronts[1:]:
        mode = [(best["mode"], best["robust"] if best["robust"] in ROBUST else "max")]
        extra = _measured_candidates(context, costs, weights, forced, budget, mode, front, optional=True)
        candidates += _measure(context, extra, closed_loop)
    refinement, refined = _refine(context, _least_measured(candidates), costs, weights, forced, closed_loop)
    candidates += refined
    best = _passing_best(context, candidates, costs, weights, forced, modes, closed_loop)
    return best, _closed_loop_summary(candidates, best, refinement, closed_loop.generations - start)


def _fronts(context: FitContext, closed_loop: ClosedLoop | None) -> tuple[int, ...]:
    """Corrector fronts to try: the user's, else every candidate depth when a closed loop can measure them.

    Reuse costs are measured for the whole stack only, so a corrector schedule's predicted error is the whole-stack
    one (computing the front blocks fresh can only shrink what is reused); only the closed loop prices it fairly.

    Raises:
        PlannerError: the user's front leaves fewer than two blocks to reuse.
    """
    front = context.options.front_blocks
    if front is not None:
        if not 0 <= front <= context.blocks - 2:
            raise PlannerError(
                f"--front-blocks {front} leaves no span to reuse: use 0 to {context.blocks - 2} for "
                f"{context.blocks} blocks"
            )
        return (front,)
    return corrector_fronts(context.blocks) if closed_loop is not None else (0,)


def measured_costs(context: FitContext) -> ReuseCosts:
    """Reuse costs from the profiles' Gram matrices, for runs up to the lags recorded (and --max-reuse)."""
    profiles = context.profiles
    lags = profiles.stack("reuse_gram").shape[-1]
    runs = min((lags - 1) // 2, context.options.max_reuse or lags)
    residual_sq = profiles.stack(SCALED_HOLD_FIELD) if profiles.has(SCALED_HOLD_FIELD) else None
    gram, output_sq = profiles.stack("reuse_gram"), profiles.stack("stack_output_sq")
    return reuse_costs(gram, output_sq, max_run=runs, residual_sq=residual_sq)


def measured_weights(context: FitContext, costs: ReuseCosts) -> np.ndarray:
    """Per step, the final-latent error of a unit stack-output error there: |σ_s − σ_{s+1}|, rescaled where the
    profile measured step sensitivity so that a single reused step predicts exactly the final error measured."""
    weights = step_weights(context.profiles.header.sigmas)
    measured = context.profiles.stack_recorded("step_sensitivity")
    if measured is None:
        return weights
    single = np.nan_to_num(costs.hold[: len(measured), :, 0]).mean(axis=0)
    return sensitivity_weights(weights, single[None, :], measured)


def _measured_candidates(
    context: FitContext,
    costs: ReuseCosts,
    weights: np.ndarray,
    forced: np.ndarray,
    budget: Budget,
    modes: Sequence[tuple[str, str]],
    front: int = 0,
    optional: bool = False,
) -> list[dict[str, Any]]:
    """One least-cost schedule per (reuse mode, robust aggregate) with `front` corrector blocks under the budget,
    duplicates dropped; none when the budget is out of reach and the front is `optional`."""
    candidates, seen = [], set()
    for mode, robust in modes:
        result = search(cell_costs(costs, mode, robust), weights, forced)
        try:
            computed = _computed_steps(context, result.cost, result.reachable(), budget, costs.max_run, front)
        except PlannerError:
            if optional:
                return []
            raise
        candidate = measured_candidate(context, costs, weights, (mode, robust), result.schedule(computed), front)
        key = (mode, candidate["reuse"].tobytes())
        if key not in seen:
            seen.add(key)
            candidates.append(candidate)
    return candidates


def _measure(context: FitContext, candidates: list[dict[str, Any]], closed_loop: ClosedLoop) -> list[dict[str, Any]]:
    """`candidates`, each with its closed-loop measurement (per calibration prompt) under "measured"."""
    for candidate in candidates:
        candidate["measured"] = closed_loop.measure(candidate_plan(context, candidate))
    return candidates


def _least_measured(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the least robust measured error (`tail_error`; the faster one on a tie)."""
    return min(candidates, key=lambda c: (tail_error(c["measured"]), -c["speedup"]))


def _even_candidates(
    context: FitContext,
    costs: ReuseCosts,
    weights: np.ndarray,
    forced: np.ndarray,
    searched: list[dict[str, Any]],
    modes: Sequence[tuple[str, str]],
) -> list[dict[str, Any]]:
    """Evenly spaced schedules with as many computed steps as the first searched candidate, one per reuse mode: starts
    for the closed loop away from the cost model's picks (none when a forced step falls off them, a run outruns the
    measured costs, or a searched candidate is the same)."""
    fixed = forced.copy()
    fixed[0] = True
    reuse = evenly_spaced(context.steps, int((~searched[0]["reuse"]).sum()), fixed)
    if reuse is None or longest_reuse_run(np.where(reuse, REUSE, COMPUTE)) > costs.max_run:
        return []
    return [
        measured_candidate(context, costs, weights, (mode, "even"), reuse)
        for mode in dict.fromkeys(m for m, _ in modes)
        if not any(c["mode"] == mode and np.array_equal(c["reuse"], reuse) for c in searched)
    ]


def _refine(
    context: FitContext,
    start: dict[str, Any],
    costs: ReuseCosts,
    weights: np.ndarray,
    forced: np.ndarray,
    closed_loop: ClosedLoop,
) -> tuple[Refinement, list[dict[str, Any]]]:
    """Refine the best measured candidate by measured local search (`refine.py`), keeping its mode and front; the
    refinement, and its kept schedule as a closed-loop candidate (none when no move helped)."""
    mode = (start["mode"], start["robust"])

    def measure(reuse: np.ndarray, order: list[int], bound: float | None) -> np.ndarray:
        trial = measured_candidate(context, costs, weights, mode, reuse, start["front"])
        return closed_loop.measure(candidate_plan(context, trial), order, bound)

    fixed = forced.copy()
    fixed[0] = True
    rounds = DEFAULT_ROUNDS if context.options.refine_rounds is None else context.options.refine_rounds
    result = refine(start["reuse"], start["measured"], measure, fixed, costs.max_run, rounds)
    if not result.rounds:
        return result, []
    refined = measured_candidate(context, costs, weights, mode, result.reuse, start["front"])
    refined["measured"] = result.errors
    refined["refined"] = True
    return result, [refined]


def _schedule_with(
    context: FitContext,
    costs: ReuseCosts,
    weights: np.ndarray,
    mode: tuple[str, str],
    result: SearchResult,
    computed: int,
) -> dict[str, Any] | None:
    """The least-cost candidate of a search over one (reuse mode, aggregate) with exactly `computed` computed steps."""
    if not np.isfinite(result.cost[computed]):
        return None
    return measured_candidate(context, costs, weights, mode, result.schedule(computed))


def measured_candidate(
    context: FitContext,
    costs: ReuseCosts,
    weights: np.ndarray,
    mode: tuple[str, str],
    reuse: np.ndarray,
    front: int = 0,
) -> dict[str, Any]:
    """A schedule as a candidate: actions (the first `front` blocks always computed), predicted worst-prompt error
    and FLOP speedup."""
    predictor = context.predictor
    actions = np.where(reuse[None, :], REUSE, COMPUTE).astype(np.uint8).repeat(context.blocks, axis=0)
    actions[:front] = COMPUTE
    worst = walk_cost(reuse, cell_costs(costs, mode[0], "max"), weights)
    return {
        "mode": mode[0],
        "robust": mode[1],
        "front": front,
        "actions": actions,
        "reuse": reuse,
        "error": worst,
        "speedup": predictor.speedup(actions),
        "costs": costs,
    }


def _closed_loop_summary(
    candidates: list[dict[str, Any]], best: dict[str, Any], refinement: Refinement, generations: int
) -> dict[str, Any]:
    """What the plan records of its closed loop: every candidate's prediction next to its measurement, what
    refinement tried and kept, and how many generations it all took."""
    return {
        "prompts": int(best["measured"].size),
        "measured_worst": float(best["measured"].max()),
        "measured_mean": float(best["measured"].mean()),
        "measured_tail": tail_error(best["measured"]),
        "generations": generations,
        "refinement": {
            "rounds": refinement.rounds,
            "tried": refinement.tried,
            "moves": [list(move) for move in refinement.moves],
        },
        "candidates": [
            {
                "reuse": c["mode"],
                "objective": c["robust"],
                "front_blocks": c["front"],
                "refined": bool(c.get("refined", False)),
                "speedup": float(c["speedup"]),
                "predicted": float(c["error"]),
                "measured_worst": float(c["measured"].max()),
                "measured_mean": float(c["measured"].mean()),
                "measured_tail": tail_error(c["measured"]),
            }
            for c in candidates
        ],
    }


def _computed_steps(
    context: FitContext, cost: np.ndarray, reachable: np.ndarray, budget: Budget, max_run: int, front: int = 0
) -> int:
    """How many steps compute: the fewest within the error cap, or the least-cost count meeting the target speedup."""
    predictor, steps = context.predictor, context.steps
    speedups = {int(n): _stack_speedup(predictor, steps, int(n), front) for n in reachable}
    if budget.max_error is not None:
        within = [n for n in speedups if cost[n] <= budget.max_error]
        if not within:
            raise PlannerError(
                f"max error {budget.max_error:g} is impossible: the least predicted error is {cost[max(speedups)]:.4g}"
            )
        return min(within)
    fast = [n for n, s in speedups.items() if s >= budget.target_speedup - 1e-9]
    if not fast:
        best = max(speedups.values())
        raise PlannerError(
            f"target speedup {budget.target_speedup:g}x is impossible: at most {best:.3f}x with reuse runs of at "
            f"most {max_run} steps"
        )
    return min(fast, key=lambda n: (cost[n], n))


def _stack_speedup(predictor: Predictor, steps: int, computed: int, front: int = 0) -> float:
    """FLOP speedup of `computed` full steps, the other steps computing only the first `front` blocks."""
    full = float(predictor.block_flops.sum())
    kept = float(predictor.block_flops[:front].sum())
    return (
        (full + predictor.other_flops)
        * steps
        / (full * computed + kept * (steps - computed) + predictor.other_flops * steps)
    )


def candidate_plan(context: FitContext, candidate: dict[str, Any]) -> Plan:
    """The bare plan of one measured candidate (schedule, spans, reuse policy): what the closed loop replays."""
    policy, arrays = reuse_policy(candidate["mode"], candidate["costs"])
    header = context.profiles.header
    return Plan(
        model=header.fingerprint,
        timesteps=header.timesteps,
        sigmas=header.sigmas,
        actions=candidate["actions"],
        spans=group_spans(candidate["actions"]),
        policy=policy,
        arrays=arrays,
    )


def _passes(candidate: dict[str, Any]) -> bool:
    """Whether a measured candidate passes its closed loop: worst prompt within 3 dB of its predicted error."""
    return float(candidate["measured"].max()) <= candidate["error"] * FAIL_RATIO


def _passing_best(
    context: FitContext,
    candidates: list[dict[str, Any]],
    costs: ReuseCosts,
    weights: np.ndarray,
    forced: np.ndarray,
    modes: Sequence[tuple[str, str]],
    closed_loop: ClosedLoop,
) -> dict[str, Any]:
    """The least measured candidate among those that pass their closed loop.

    Raises:
        PlannerError: none passes; the message names the next slower schedule that does (tried one computed step
            more at a time: slower schedules need not pass more easily, since the test is against each one's own
            prediction).
    """
    passing = [c for c in candidates if _passes(c)]
    if passing:
        return _least_measured(passing)
    best = _least_measured(candidates)
    worst = float(best["measured"].max())
    result = search(cell_costs(costs, *modes[0]), weights, forced)
    slower = "no slower schedule passes either"
    for computed in range(int((~best["reuse"]).sum()) + 1, context.steps):
        trial = _schedule_with(context, costs, weights, modes[0], result, computed)
        if trial is None:
            continue
        trial["measured"] = closed_loop.measure(candidate_plan(context, trial))
        if _passes(trial):
            slower = f"the next slower schedule that passes is {trial['speedup']:.2f}x"
            break
    raise PlannerError(
        f"the {best['speedup']:.2f}x plan fails its closed loop: worst calibration prompt measured error {worst:.4g}, "
        f"{20 * np.log10(worst / max(best['error'], 1e-12)):.1f} dB worse than predicted ({best['error']:.4g}); "
        f"{slower} at {context.steps} steps (more steps, or a lower --target-speedup)"
    )


METHOD_FITTERS: dict[str, Callable[[FitContext], MethodResult]] = {
    "profilingdit": fit_profilingdit,
    "adacache": fit_adacache,
    "bwcache": fit_bwcache,
    "unicp": fit_unicp,
    "auto": fit_auto,
}


def assemble_plan(context: FitContext, result: MethodResult) -> Plan:
    """The plan file's content: schedule, labels, spans, policy, arrays, provenance and prediction."""
    header = context.profiles.header
    predictor = result.predictor or context.predictor
    arrays = {**predictor.to_arrays(), **result.arrays}
    if context.pca is not None:
        arrays.update(context.pca.to_arrays())
        arrays["dws_weight"] = predictor.dws_weights(result.actions)
    static = result.policy["kind"] == "static"
    alone = blending_blocks(result.actions, arrays.get("dws_weight"))
    spans = group_spans(result.actions, alone) if static else ((0, context.blocks),) if context.blocks > 1 else ()
    labels = context.labels
    return Plan(
        model=header.fingerprint,
        timesteps=header.timesteps,
        sigmas=header.sigmas,
        actions=result.actions,
        labels=labels.labels if labels else (),
        label_scores=labels.scores if labels else None,
        spans=spans,
        policy=result.policy,
        provenance=_provenance(context, result),
        predicted={
            "error_model": ERROR_MODEL_SENSITIVITY if context.sensitivity_measured else ERROR_MODEL,
            **_finite(result.predicted),
        },
        arrays=arrays,
    )


def _provenance(context: FitContext, result: MethodResult) -> dict[str, Any]:
    provenance: dict[str, Any] = {
        "planner_version": PLANNER_VERSION,
        "method": context.options.method,
        "parameters": {
            **context.options.to_json(),
            "warmup": context.warmup,
            "protect_last": context.protect_last,
            "max_reuse": context.max_reuse,
        },
        "chosen": result.chosen,
        "profiles": [source.to_json() for source in context.profiles.sources],
        "profile_settings": context.profiles.header.settings,
        "grid": [int(v) for v in context.profiles.header.grid],
    }
    if context.labels is not None:
        labels = context.labels
        provenance["labels"] = {
            "threshold": labels.threshold,
            "chance": labels.chance,
            "rule": context.options.label_rule,
            "quantile": context.options.label_quantile,
        }
    if context.pca is not None:
        provenance["pca"] = {
            "variance": context.options.pca_variance,
            "ranks": [int(r) for r in context.pca.ranks],
            "distortion": [float(d) for d in context.pca.distortion],
        }
    return provenance


def _finite(predicted: dict[str, Any]) -> dict[str, Any]:
    """Predictions as JSON numbers; an infinite speedup (nothing left to compute) is refused."""
    for key, value in predicted.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PlannerError(f"predicted {key} is not finite ({value}); the profile's FLOP counts look wrong")
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in predicted.items()}
