"""`dit-demo`: the main job, end to end on the embedded default model.

1. profile calibration captions with `dit-profile`'s library (`dit_accel.profiler.run.profile_prompts`);
2. fit an `auto` plan at the target speedup (`dit_accel.planner.fit_plan`);
3. generate held-out captions with and without the plan from the same seeds (interleaved, repeated) and print the
   measured wall-clock and FLOP speedup next to PSNR / SSIM against the un-accelerated videos;
4. write the plan, the profile, and GIFs of the first held-out caption (full and accelerated) into `--out`.

A rerun with the same options reuses the finished profile (`--resume` semantics) instead of profiling again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dit_accel.harness.captions import CALIBRATION, HELD_OUT
from dit_accel.harness.cli import OneLineErrorCommand, emit_report, user_errors
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner.methods import FitOptions, fit_plan
from dit_accel.planner.validate import PipelineRunner, validate_plan
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts
from dit_accel.runtime import apply_plan, save_plan


def calibration_profile(pipe: Any, path: Path, prompts: int, steps: int, progress: bool = True) -> Path:
    """Profile the first `prompts` calibration captions at `steps` steps into `path` (resuming what is there)."""
    specs = [PromptSpec(text, "", 1000 + i) for i, text in enumerate(CALIBRATION[:prompts])]
    profile_prompts(
        pipe, specs, path, RecordSettings(num_inference_steps=steps), resume=path.exists(), progress=progress
    )
    return path


def run_demo(
    out: Path, calibration: int, held_out: int, steps: int, target_speedup: float, repeats: int, progress: bool = True
) -> dict[str, Any]:
    """Profile → fit → validate on the default model; returns the report (also written to `out/report.json`)."""
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(None)
    profile = calibration_profile(pipe, out / f"profile_{steps}steps.h5", calibration, steps, progress)
    plan = fit_plan([str(profile)], FitOptions(method="auto", target_speedup=target_speedup))
    save_plan(plan, out / "auto.plan")
    report = validate_plan(
        plan, PipelineRunner(pipe), HELD_OUT[:held_out], steps=steps, repeats=repeats, progress=progress
    )
    _write_gifs(pipe, plan, HELD_OUT[0], steps, out)
    result = {
        "plan": str(out / "auto.plan"),
        "profile": str(profile),
        "target_speedup": target_speedup,
        **report.to_json(),
    }
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _write_gifs(pipe: Any, plan: Any, prompt: str, steps: int, out: Path) -> None:
    from dit_accel.defaultmodel.video_io import save_gif

    runner = PipelineRunner(pipe)
    save_gif(runner.generate(prompt, 0, steps), out / "full.gif")
    with apply_plan(pipe, plan):
        save_gif(runner.generate(prompt, 0, steps), out / "accelerated.gif")


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
    return "\n".join(
        [f"plan {report['plan']} (auto, target {report['target_speedup']}x, {report['steps']} steps)", *rows]
    )


@click.command(cls=OneLineErrorCommand, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--steps", default=50, show_default=True, type=click.IntRange(4, 500), help="Denoising steps.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def main(
    out: str,
    calibration: int,
    held_out: int,
    steps: int,
    target_speedup: float,
    repeats: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """Profile the default model, fit a plan, and measure accelerated generation against the full model."""
    report = run_demo(Path(out), calibration, held_out, steps, target_speedup, repeats, progress=not quiet)
    emit_report(report, as_json, render)
