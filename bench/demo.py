"""`dit-demo`: the main job, end to end on the embedded default model.

1. profile calibration captions with `dit-profile`'s library (`dit_accel.profiler.run.profile_prompts`);
2. fit an `auto` plan at the target speedup (`dit_accel.planner.fit_plan`);
3. generate held-out captions with and without the plan from the same seeds (interleaved, repeated) and print the
   measured wall-clock and FLOP speedup next to PSNR / SSIM against the un-accelerated videos;
4. write the plan, the profile, and GIFs of the first held-out caption (full and accelerated) into `--out`.

A rerun with the same options reuses the finished profile (`--resume` semantics) instead of profiling again.
Each phase prints one line on stderr (unless `--quiet`), and the summary ends with every file written. The library
is imported inside the functions, so that `dit-demo --help` does not import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from dit_accel.harness.captions import CALIBRATION, HELD_OUT
from dit_accel.harness.cli import (
    CONTEXT_SETTINGS,
    DEVICE,
    DTYPE,
    JSON,
    QUIET,
    OneLineErrorCommand,
    emit_report,
    say,
    steps_option,
    user_errors,
)


def calibration_profile(pipe: Any, path: Path, prompts: int, steps: int, progress: bool = True) -> Path:
    """Profile the first `prompts` calibration captions at `steps` steps into `path` (resuming what is there)."""
    from dit_accel.harness.prompts import PromptSpec
    from dit_accel.profiler.recorder import RecordSettings
    from dit_accel.profiler.run import profile_prompts

    specs = [PromptSpec(text, "", 1000 + i) for i, text in enumerate(CALIBRATION[:prompts])]
    profile_prompts(
        pipe, specs, path, RecordSettings(num_inference_steps=steps), resume=path.exists(), progress=progress
    )
    return path


def run_demo(
    out: Path,
    calibration: int,
    held_out: int,
    steps: int,
    target_speedup: float,
    repeats: int,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Profile → fit → validate on the default model; returns the report (also written to `out/report.json`)."""
    from dit_accel.harness.files import write_bytes_atomic
    from dit_accel.harness.pipelines import load_pipeline
    from dit_accel.harness.prompts import PromptSpec
    from dit_accel.planner.closed_loop import ClosedLoop, closed_loop_from_profile
    from dit_accel.planner.methods import FitOptions, fit_profiles
    from dit_accel.planner.profiles import load_profiles
    from dit_accel.planner.validate import PipelineRunner, validate_plan
    from dit_accel.runtime import save_plan

    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(None, device=device, dtype=dtype)
    say(f"1/5 profiling {calibration} calibration caption(s) at {steps} steps", not progress)
    profile = calibration_profile(pipe, out / f"profile_{steps}steps.h5", calibration, steps, progress)
    say(f"2/5 fitting auto at {target_speedup:g}x (closed loop on the calibration captions)", not progress)
    profiles = load_profiles([str(profile)])
    loop = closed_loop_from_profile(pipe, profiles.profiles[0].prompts, profiles.header.settings, progress=progress)
    # no measured refinement: it would take several times the rest of the demo (`dit-plan fit` refines by default)
    plan = fit_profiles(profiles, FitOptions(method="auto", target_speedup=target_speedup, refine_rounds=0), loop)
    save_plan(plan, out / "auto.plan")
    say(f"3/5 measuring the final-latent error on {held_out} held-out caption(s)", not progress)
    held_out_specs = [PromptSpec(text, "", i) for i, text in enumerate(HELD_OUT[:held_out])]
    held_out_error = ClosedLoop(pipe, held_out_specs, loop.guidance, loop.size).measure(plan)
    say(f"4/5 validating: {repeats} interleaved repeat(s), then FLOPs of the first caption", not progress)
    report = validate_plan(plan, PipelineRunner(pipe), held_out_specs, steps=steps, repeats=repeats, progress=progress)
    say("5/5 writing GIFs of the first held-out caption (full and accelerated)", not progress)
    gifs = _write_gifs(pipe, plan, HELD_OUT[0], steps, out)
    result = {
        "plan": str(out / "auto.plan"),
        "profile": str(profile),
        "target_speedup": target_speedup,
        **report.to_json(),
        **_prediction_check(float(plan.predicted["error"]), float(held_out_error.max())),
        "written": [str(out / "auto.plan"), str(profile), *map(str, gifs), str(out / "report.json")],
    }
    write_bytes_atomic(out / "report.json", json.dumps(result, indent=2, default=str).encode())
    return result


def _prediction_check(predicted: float, held_out: float) -> dict[str, Any]:
    """The plan's predicted final-latent error next to the worst held-out caption's, with a warning past 3 dB."""
    from dit_accel.planner.closed_loop import FAIL_RATIO

    gap_db = 20 * math.log10(max(held_out, 1e-12) / max(predicted, 1e-12))
    warning = None
    if held_out > predicted * FAIL_RATIO:
        warning = (
            f"held-out fidelity is {gap_db:.1f} dB worse than the plan predicted (final-latent error {held_out:.4g} "
            f"vs {predicted:.4g}); fit at more steps or a lower speedup"
        )
    return {"predicted_error": predicted, "held_out_latent_error": held_out, "warning": warning}


def _write_gifs(pipe: Any, plan: Any, prompt: str, steps: int, out: Path) -> list[Path]:
    """GIFs of `prompt` generated without and with `plan` (same seed); returns their paths."""
    from dit_accel.defaultmodel.video_io import save_gif
    from dit_accel.harness.prompts import PromptSpec
    from dit_accel.planner.validate import PipelineRunner
    from dit_accel.runtime import apply_plan

    runner, spec = PipelineRunner(pipe), PromptSpec(prompt)
    full = runner.generate(spec, steps)
    with apply_plan(pipe, plan):
        accelerated = runner.generate(spec, steps)
    return [save_gif(full, out / "full.gif"), save_gif(accelerated, out / "accelerated.gif")]


def render(report: dict[str, Any]) -> str:
    """The demo's summary as a short table."""
    rows = [
        "| measured on held-out captions | value |",
        "|---|---|",
        f"| wall-clock speedup (median of {report['repeats']} interleaved repeats) | {report['wall_speedup']:.2f}x |",
        f"| transformer FLOP speedup | {report['flop_speedup']:.2f}x (predicted {report['predicted_speedup']:.2f}x) |",
    ]
    rows += [
        f'| PSNR / SSIM: "{p["prompt"]}" | {p["psnr"] if isinstance(p["psnr"], str) else format(p["psnr"], ".1f")} '
        f"dB / {p['ssim']:.3f} |"
        for p in report["prompts"]
    ]
    rows.append(
        f"| final-latent error, worst caption | {report['held_out_latent_error']:.4g} "
        f"(predicted {report['predicted_error']:.4g}) |"
    )
    lines = [f"plan {report['plan']} (auto, target {report['target_speedup']}x, {report['steps']} steps)", *rows]
    if report.get("warning"):
        lines.append(f"warning: {report['warning']}")
    lines.append("wrote " + ", ".join(report["written"]))
    return "\n".join(lines)


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--out",
    default="artifacts/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for profile, plan, GIFs and report.",
)
@click.option(
    "--calibration",
    default=4,
    show_default=True,
    type=click.IntRange(1, len(CALIBRATION)),
    help="Calibration captions to profile.",
)
@click.option(
    "--held-out",
    default=2,
    show_default=True,
    type=click.IntRange(1, len(HELD_OUT)),
    help="Held-out captions to validate on.",
)
@steps_option(default=50, minimum=4)
@click.option(
    "--target-speedup",
    default=2.0,
    show_default=True,
    type=click.FloatRange(1.0, min_open=True),
    help="Speedup the plan is fitted for (FLOPs).",
)
@click.option(
    "--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed repeats per prompt and variant."
)
@DEVICE
@DTYPE
@JSON
@QUIET
@user_errors
def main(
    out: str,
    calibration: int,
    held_out: int,
    steps: int,
    target_speedup: float,
    repeats: int,
    device: str,
    dtype: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Profile the default model, fit a plan, and measure accelerated generation against the full model.

    The embedded default model only (no --model): its calibration and held-out captions are built in.
    """
    report = run_demo(
        Path(out), calibration, held_out, steps, target_speedup, repeats, not quiet, device=device, dtype=dtype
    )
    emit_report(report, as_json, render)
