"""Step sensitivity: how much reusing the whole block stack at one step changes the final latent.

Residual drift says how much a block's output changes between adjacent steps, but not what an error at that step
does to the video: a velocity error early in sampling moves the trajectory the model then keeps denoising from, while
one near the end lands almost as it is. On the default model (20 steps) the final-latent error of reusing one step,
divided by what drift × |Δσ| predicts, falls from about 18 at step 1 to 0.3 at step 18, so a drift-only error model
schedules reuse exactly where it hurts most.

So the profiler measures it directly, for the first prompt(s) of a run: one reference generation, then for each of
`sensitivity_steps` steps spread over the run, one generation that reuses every block's cached residual at that
step alone (through the runtime's own replay). The field `step_sensitivity` [step] holds ‖x − x_ref‖ / ‖x_ref‖ of the
final latents at the measured steps and NaN elsewhere; the planner scales its per-step error weights to match it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dit_accel.harness.pipelines import generate
from dit_accel.harness.prompts import PromptSpec
from dit_accel.runtime.adapters import find_transformer, fingerprint_pipeline, get_adapter
from dit_accel.runtime.plan import COMPUTE, REUSE, Plan
from dit_accel.runtime.replay import apply_plan

from .recorder import RecordSettings


def sensitivity_steps(num_steps: int, count: int) -> list[int]:
    """`count` steps spread evenly over 1 … num_steps − 2 (step 0 has no cache; the last step is never reused)."""
    if count <= 0 or num_steps < 3:
        return []
    return sorted({int(s) for s in np.rint(np.linspace(1, num_steps - 2, min(count, num_steps - 2)))})


def measure_sensitivity(
    pipe: Any,
    spec: PromptSpec,
    settings: RecordSettings,
    size: dict[str, int],
    progress: bool | None = None,
) -> np.ndarray:
    """Final-latent relative error of reusing the whole stack at each measured step ([steps], NaN where unmeasured).

    `spec` is the whole prompt (text, negative prompt, seed, and any image or extra pipeline inputs). These
    1 + `sensitivity_steps` generations take as long as that many prompts, so they get their own progress bar (in
    transformer calls; `progress=None`: shown only on a terminal).
    """
    from tqdm.auto import tqdm

    steps = settings.num_inference_steps
    transformer = find_transformer(pipe)
    blocks = len(get_adapter(transformer).block_ids(transformer))
    fingerprint = fingerprint_pipeline(pipe)
    measured = sensitivity_steps(steps, settings.sensitivity_steps)

    def final_latent() -> torch.Tensor:
        with torch.no_grad():
            return generate(pipe, spec, steps, settings.guidance_scale, size, output_type="latent").float()

    bar = tqdm(desc="step sensitivity", unit="call", leave=False, disable=None if progress is None else not progress)

    def count_call(*_: Any) -> None:  # returns None, so the call's arguments stay as they are
        bar.update()

    counter = transformer.register_forward_pre_hook(count_call)
    try:
        reference = final_latent()
        bar.total = bar.n * (1 + len(measured))  # every generation makes as many transformer calls as the first
        scale = float(reference.norm())
        result = np.full(steps, np.nan, dtype=np.float32)
        for step in measured:
            actions = np.full((blocks, steps), COMPUTE, np.uint8)
            actions[:, step] = REUSE
            plan = Plan(model=fingerprint, timesteps=np.linspace(999.0, 0.0, steps), actions=actions)
            with apply_plan(pipe, plan):
                result[step] = float((final_latent() - reference).norm()) / max(scale, 1e-12)
    finally:
        counter.remove()
        bar.close()
    return result
