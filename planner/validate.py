"""`dit-plan validate`: measure a plan on held-out prompts against the un-accelerated model, and tighten it.

Every prompt is generated with and without the plan from the same seed; fidelity is PSNR (global MSE) and SSIM of
the accelerated video against the full one. Speed is the wall-clock ratio of the median full run to the median
planned run (runs interleaved, alternating which goes first, after one warm-up run), and the FLOP ratio of the first
prompt, counted for the transformer (comparable to the prediction) and for the whole pipeline. Forward hooks on the
blocks also time what happens inside them: their share of a full run gives the wall speedup that cutting block calls
alone allows (Amdahl's law; the text encoder, VAE, embeddings and scheduler still run), and the ratio of block time
with and without the plan shows what the runtime's reuse costs where it acts.

Tightening is a closed loop: while some prompt is below the minimum PSNR, the plan's own error model (`predict.py`)
recomputes the cells that remove the most predicted error per FLOP, enough to close the PSNR gap if
PSNR ≈ C − 20·log10(error) (and at least a quarter of the skipped cells), span by span so synchronised schedules
stay synchronised, then validates again.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dit_accel.harness.metrics import psnr, ssim
from dit_accel.harness.pipelines import first_video, generate
from dit_accel.harness.prompts import PromptSpec
from dit_accel.profiler.flops import count_flops
from dit_accel.runtime.adapters import find_experts, get_adapter
from dit_accel.runtime.plan import COMPUTE, REUSE, Plan
from dit_accel.runtime.replay import apply_plan
from dit_accel.runtime.replay_table import remap_actions

from .errors import PlannerError
from .predict import Predictor, predictor_from_plan
from .shapes import blending_blocks, group_spans
from .solver import restore_schedule

MARGIN_DB = 0.5


class PipelineRunner:
    """Generates one video per prompt (its text, seed, negative prompt, image and extra inputs) with a
    diffusers-style video pipeline."""

    def __init__(self, pipe: Any, guidance_scale: float = 5.0, size: dict[str, int] | None = None) -> None:
        self.pipe = pipe
        self.guidance_scale = guidance_scale
        self.size = dict(size or {})
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def generate(self, spec: PromptSpec, steps: int) -> np.ndarray:
        """Video [frames, height, width, rgb] in [0, 1]."""
        return first_video(generate(self.pipe, spec, steps, self.guidance_scale, self.size))


@dataclass(frozen=True)
class PromptResult:
    """Fidelity of the planned video of one prompt against the full one."""

    prompt: str
    seed: int
    psnr: float
    ssim: float


@dataclass(frozen=True)
class ValidationReport:
    """Measured speed and fidelity of a plan, next to what the planner predicted."""

    steps: int
    repeats: int
    prompts: tuple[PromptResult, ...]
    wall_full_s: float
    wall_plan_s: float
    flop_speedup: float | None
    pipeline_flop_speedup: float | None
    predicted_speedup: float | None
    predicted_error: float | None
    #: Median share of a full run's wall time spent inside the transformer blocks.
    block_share: float | None = None
    #: Median time inside the blocks, full run over planned run (what the runtime gains where it acts).
    block_wall_speedup: float | None = None
    #: All block calls over computed ones (a static plan's schedule at the run's step count; None if adaptive).
    block_call_speedup: float | None = None

    @property
    def wall_speedup(self) -> float:
        return self.wall_full_s / self.wall_plan_s

    @property
    def wall_bound(self) -> float | None:
        """The wall speedup the block-call speedup allows when only block time shrinks (Amdahl's law)."""
        if self.block_share is None or self.block_call_speedup is None:
            return None
        return 1.0 / ((1.0 - self.block_share) + self.block_share / self.block_call_speedup)

    @property
    def min_psnr(self) -> float:
        return min(p.psnr for p in self.prompts)

    def calibration_db(self) -> float | None:
        """C in PSNR ≈ C − 20·log10(predicted error), from the median over prompts (None when not measurable)."""
        if not self.predicted_error or self.predicted_error <= 0:
            return None
        values = [p.psnr + 20 * math.log10(self.predicted_error) for p in self.prompts if math.isfinite(p.psnr)]
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompts"] = [_finite_json(asdict(p)) for p in self.prompts]
        data.update(
            wall_speedup=self.wall_speedup,
            wall_bound=self.wall_bound,
            min_psnr=_json_number(self.min_psnr),
            calibration_db=self.calibration_db(),
        )
        return data


def _json_number(value: float) -> float | str:
    """Infinite PSNR (identical videos) as the string "inf", since JSON has no infinity."""
    return value if math.isfinite(value) else "inf"


def _finite_json(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_number(v) if isinstance(v, float) else v for k, v in data.items()}


def profiled_generation(plan: Plan) -> tuple[float, dict[str, int]]:
    """(guidance scale, video size kwargs) the plan's profile was recorded with (5.0 and the pipeline's size if
    unknown)."""
    settings = plan.provenance.get("profile_settings", {})
    size = {key[len("size_") :]: int(value) for key, value in settings.items() if key.startswith("size_")}
    return float(settings.get("guidance_scale", 5.0)), size


def validate_plan(
    plan: Plan,
    runner: PipelineRunner,
    prompts: Sequence[PromptSpec],
    *,
    steps: int | None = None,
    repeats: int = 3,
    flops: bool = True,
    warmup: bool = True,
    progress: bool = True,
) -> ValidationReport:
    """Run full and planned generations of every prompt (interleaved) and report speed and fidelity.

    `warmup` runs one untimed generation first (first-call overheads); `flops` counts FLOPs on the first prompt.
    """
    steps = _check_steps(plan, steps)
    if repeats < 1 or not prompts:
        raise PlannerError("validation needs at least one prompt and one repeat")
    with apply_plan(runner.pipe, plan):
        pass  # refuses a plan this model or runtime cannot replay before any long run
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * len(prompts) * repeats + warmup, desc="validate", unit="run", disable=not progress)
    if warmup:
        runner.generate(prompts[0], steps)
        bar.update()
    times: dict[str, list[float]] = {"full": [], "plan": []}
    block_times: dict[str, list[float]] = {"full": [], "plan": []}
    results = []
    for spec in prompts:
        videos = {}
        for repeat in range(repeats):
            for variant in ("full", "plan") if repeat % 2 == 0 else ("plan", "full"):
                with BlockClock(runner.pipe) as clock:
                    elapsed, video = _timed(runner, plan if variant == "plan" else None, spec, steps)
                times[variant].append(elapsed)
                block_times[variant].append(clock.seconds)
                videos.setdefault(variant, video)
                bar.update()
        results.append(
            PromptResult(
                spec.prompt, spec.seed, psnr(videos["plan"], videos["full"]), ssim(videos["plan"], videos["full"])
            )
        )
    bar.close()
    flop_speedup, pipeline_flop_speedup = (
        _flop_speedups(runner, plan, prompts[0], steps, progress) if flops else (None, None)
    )
    predicted = plan.predicted
    return ValidationReport(
        steps,
        repeats,
        tuple(results),
        statistics.median(times["full"]),
        statistics.median(times["plan"]),
        flop_speedup,
        pipeline_flop_speedup,
        predicted.get("speedup"),
        predicted.get("error"),
        statistics.median(b / t for b, t in zip(block_times["full"], times["full"], strict=True)),
        statistics.median(block_times["full"]) / max(statistics.median(block_times["plan"]), 1e-12),
        _block_call_speedup(plan, steps),
    )


def _block_call_speedup(plan: Plan, steps: int) -> float | None:
    """All block calls over computed ones of a static plan at `steps` steps (None for adaptive policies)."""
    if plan.policy.get("kind", "static") != "static":
        return None
    actions = remap_actions(plan.actions, steps)
    return actions.size / max(int((actions != REUSE).sum()), 1)


class BlockClock:
    """Wall time spent inside the transformer blocks of every expert while the context is open (forward hooks)."""

    def __init__(self, pipe: Any) -> None:
        self.seconds = 0.0
        self._modules = [
            block for _, expert in find_experts(pipe) for _, block, _ in get_adapter(expert).iter_blocks(expert)
        ]
        self._handles: list[Any] = []
        self._started = 0.0

    def __enter__(self) -> BlockClock:
        for block in self._modules:
            self._handles.append(block.register_forward_pre_hook(self._start))
            self._handles.append(block.register_forward_hook(self._stop))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _start(self, *_: Any) -> None:
        self._started = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._started


def _check_steps(plan: Plan, steps: int | None) -> int:
    """The run length: the plan's own, or another one the runtime can remap the plan to (refused here if not)."""
    if steps is None:
        return plan.num_inference_steps
    if steps < 2:
        raise PlannerError(f"--steps must be at least 2, got {steps}")
    remap_actions(plan.actions, steps)
    return steps


def _timed(runner: PipelineRunner, plan: Plan | None, spec: PromptSpec, steps: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    video = _generate(runner, plan, spec, steps)
    return time.perf_counter() - start, video


def _generate(runner: PipelineRunner, plan: Plan | None, spec: PromptSpec, steps: int) -> np.ndarray:
    if plan is None:
        return runner.generate(spec, steps)
    with apply_plan(runner.pipe, plan):
        return runner.generate(spec, steps)


def _flop_speedups(
    runner: PipelineRunner, plan: Plan, spec: PromptSpec, steps: int, progress: bool = True
) -> tuple[float, float]:
    """(transformer FLOP ratio, whole-pipeline FLOP ratio) of a full run over a planned run of one prompt.

    Counting runs each generation several times slower than plain runs, so it shows its own two-run progress bar.
    """
    from tqdm.auto import tqdm

    roots = {type(module).__name__ for _, module in find_experts(runner.pipe)}  # every expert of Wan 2.2
    with tqdm(total=2, desc="count FLOPs", unit="run", disable=not progress) as bar:
        full_total, full_modules = count_flops(lambda: _generate(runner, None, spec, steps))
        bar.update()
        plan_total, plan_modules = count_flops(lambda: _generate(runner, plan, spec, steps))
        bar.update()
    full = sum(full_modules.get(root, 0) for root in roots) or full_total
    planned = sum(plan_modules.get(root, 0) for root in roots) or plan_total
    return full / max(planned, 1), full_total / max(plan_total, 1)


def tighten_plan(
    plan: Plan,
    runner: PipelineRunner,
    prompts: Sequence[PromptSpec],
    min_psnr: float,
    *,
    max_rounds: int = 8,
    **validate_kwargs: Any,
) -> tuple[Plan, list[ValidationReport]]:
    """Validate, and recompute more cells until every prompt reaches `min_psnr` dB; returns the plan and every
    report."""
    predictor = predictor_from_plan(plan)
    reports = []
    for round_index in range(max_rounds):
        report = validate_plan(
            plan,
            runner,
            prompts,
            **{**validate_kwargs, "warmup": round_index == 0 and validate_kwargs.get("warmup", True)},
        )
        reports.append(report)
        if report.min_psnr >= min_psnr:
            return plan, reports
        if np.all(plan.actions == COMPUTE):
            break
        target = predictor.error(plan.actions) * 10 ** (-(min_psnr + MARGIN_DB - report.min_psnr) / 20)
        skipped = int(np.sum(plan.actions != COMPUTE))
        spans = [np.arange(start, stop) for start, stop in sorted(set(plan.span_of_block()))]
        actions = restore_schedule(predictor, plan.actions, target, math.ceil(skipped / 4), spans)
        plan = _with_actions(plan, predictor, actions, {"min_psnr": min_psnr, "rounds": len(reports)})
    raise PlannerError(
        f"could not reach {min_psnr:g} dB on every prompt within {len(reports)} rounds (worst prompt "
        f"{reports[-1].min_psnr:.2f} dB)"
    )


def _with_actions(plan: Plan, predictor: Predictor, actions: np.ndarray, tightened: dict[str, Any]) -> Plan:
    """The plan with a new schedule: spans, blend weights and prediction follow it."""
    arrays = dict(plan.arrays)
    if "dws_weight" in arrays:
        arrays["dws_weight"] = predictor.dws_weights(actions)
    spans = group_spans(actions, blending_blocks(actions, arrays.get("dws_weight")))
    predicted = {**plan.predicted, **predictor.summary(actions)}
    return plan.with_changes(
        actions=actions,
        spans=spans,
        arrays=arrays,
        predicted=predicted,
        provenance={**plan.provenance, "tightened": tightened},
    )


def render_validation(report: dict[str, Any]) -> str:
    """Text form of a validation report (a `ValidationReport.to_json()`, plus 'output' when a plan was written)."""
    lines = [
        f"{len(report['prompts'])} held-out prompts, {report['steps']} steps, median of {report['repeats']} "
        "interleaved repeats",
        f"wall speedup {report['wall_speedup']:.2f}x (full {report['wall_full_s']:.3f}s, plan "
        f"{report['wall_plan_s']:.3f}s)",
    ]
    if report.get("wall_bound") is not None:
        lines.append(
            f"block calls {report['block_call_speedup']:.2f}x fewer, time inside the blocks "
            f"{report['block_wall_speedup']:.2f}x less; the blocks are {100 * report['block_share']:.1f} % of a full "
            f"run, so cutting only them allows {report['wall_bound']:.2f}x wall"
        )
    if report["flop_speedup"] is not None:
        lines.append(
            f"FLOP speedup {report['flop_speedup']:.2f}x in the transformer (predicted "
            f"{_fmt(report['predicted_speedup'])}x), {report['pipeline_flop_speedup']:.2f}x for the whole pipeline"
        )
    lines.append(
        f"predicted error {_fmt(report['predicted_error'])}; PSNR ≈ C − 20·log10(error) with measured C = "
        f"{_fmt(report['calibration_db'])} dB"
    )
    lines += [
        f"  PSNR {_fmt(p['psnr'])} dB  SSIM {p['ssim']:.4f}  seed {p['seed']}  {p['prompt']}" for p in report["prompts"]
    ]
    if report.get("output"):
        lines.append(f"tightened plan written to {report['output']} after {report['rounds']} validation rounds")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
