"""Closed loop: replay candidate plans on the calibration prompts and measure what they do to the final latent.

The error model ranks schedules from teacher-forced, per-step measurements; how errors compound over a whole
generation it only approximates. So `dit-plan fit` (for `auto`, by default) runs the pipeline: once without a plan
per calibration prompt (the reference), then once per candidate plan, and measures ‖x − x_ref‖ / ‖x_ref‖ of the final
latents (no decoding). The candidate with the least robust measured error (`tail_error`: the mean over the worst
quarter of the prompts) is kept, and every candidate's predicted and measured errors go into the plan
(`predicted["closed_loop"]`), so `dit-plan inspect` shows how far to trust the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dit_accel.harness.pipelines import generate
from dit_accel.harness.prompts import PromptSpec
from dit_accel.runtime.plan import Plan
from dit_accel.runtime.replay import apply_plan

from .errors import PlannerError

#: A plan whose measured worst-prompt error exceeds its prediction by more than this (3 dB) fails its closed loop.
FAIL_RATIO = 10 ** (3 / 20)
#: Share of the calibration prompts whose errors make up the robust measured error (at least one prompt).
TAIL_SHARE = 0.25
#: Significant digits kept of measured errors, so that plans stay byte-identical across runs on one machine.
DIGITS = 4


@dataclass
class ClosedLoop:
    """A pipeline and the calibration prompts (with the profile's guidance and video size) to measure plans on."""

    pipe: Any
    prompts: Sequence[PromptSpec]
    guidance: float
    size: dict[str, int]
    #: Count the closed loop's generations on a progress bar (stderr), one tick per generation.
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PlannerError("the closed loop needs at least one calibration prompt")
        self._references: dict[int, list[torch.Tensor]] = {}
        self._bar: Any = None
        #: Generations run so far (references included): what the closed loop has cost.
        self.generations = 0

    def measure(self, plan: Plan, order: Sequence[int] | None = None, beat: float | None = None) -> np.ndarray:
        """Relative final-latent error of `plan` on every calibration prompt ([prompt], rounded to `DIGITS`).

        Args:
            plan: the plan to replay.
            order: the order to generate the prompts in (default: as given); put the likely worst first.
            beat: stop as soon as the measured prompts prove `tail_error` cannot fall below this; the prompts not
                generated are NaN then.
        """
        steps = plan.num_inference_steps
        references = self._reference(steps)
        errors = np.full(len(self.prompts), np.nan)
        with apply_plan(self.pipe, plan):
            for index in range(len(self.prompts)) if order is None else order:
                x, ref = self._latent(self.prompts[index], steps), references[index]
                error = float((x - ref).norm() / ref.norm().clamp_min(1e-12))
                errors[index] = _round(error) if np.isfinite(error) else np.inf
                if beat is not None and tail_error(errors) >= beat:
                    break
        return errors

    def _reference(self, steps: int) -> list[torch.Tensor]:
        if steps not in self._references:
            self._references[steps] = [self._latent(spec, steps) for spec in self.prompts]
        return self._references[steps]

    def _latent(self, spec: PromptSpec, steps: int) -> torch.Tensor:
        with torch.no_grad():
            frames = generate(self.pipe, spec, steps, self.guidance, self.size, output_type="latent")
        self.generations += 1
        self._tick()
        return frames.float()

    def _tick(self) -> None:
        """Advance the progress bar (opened at the first generation: the number of candidates is not known ahead)."""
        if not self.progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="closed loop", unit="generation", leave=False)
        self._bar.update(1)


def tail_error(errors: np.ndarray) -> float:
    """Robust measured error: the mean of the worst `TAIL_SHARE` of the prompts' errors (NaN = not measured).

    With prompts missing it is a lower bound of the full value (their errors can only add to the worst quarter), which
    is what lets `ClosedLoop.measure` stop early.
    """
    errors = np.asarray(errors, dtype=np.float64)
    tail = max(1, math.ceil(errors.size * TAIL_SHARE))
    worst = np.sort(np.nan_to_num(errors, nan=0.0, posinf=np.inf))[::-1][:tail]
    return float(worst.sum() / tail)


def _round(value: float) -> float:
    return float(f"{value:.{DIGITS - 1}e}") if np.isfinite(value) else value


def closed_loop_from_profile(
    pipe: Any, prompts: Sequence[Any], settings: dict[str, Any], limit: int = 12, progress: bool = False
) -> ClosedLoop:
    """A closed loop on the first `limit` profiled prompts, with the guidance and size the profile was recorded at."""
    specs = [PromptSpec(p.prompt, p.negative_prompt, p.seed) for p in prompts[:limit]]
    size = {key[len("size_") :]: int(value) for key, value in settings.items() if key.startswith("size_")}
    return ClosedLoop(pipe, specs, float(settings.get("guidance_scale", 5.0)), size, progress)


def load_closed_loop(
    profiles: Any, model: str | None, device: str = "cpu", dtype: str = "float32", progress: bool = False
) -> ClosedLoop:
    """Load the profiled model (the embedded default model when `model` is None) and its closed loop.

    Raises:
        PlannerError: the loaded transformer is not the one the profiles were recorded on.
    """
    from dit_accel.harness.pipelines import load_pipeline
    from dit_accel.runtime.adapters import fingerprint_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype)
    if fingerprint_pipeline(pipe) != profiles.header.fingerprint:
        where = model or "the embedded default model"
        raise PlannerError(
            f"{where} is not the model the profiles were recorded on; pass it with --model, or fit with "
            "--no-closed-loop"
        )
    return closed_loop_from_profile(pipe, profiles.profiles[0].prompts, profiles.header.settings, progress=progress)
