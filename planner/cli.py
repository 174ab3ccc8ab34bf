"""dit-plan: fit plans from profiles, inspect them, validate (and tighten) them on held-out prompts.

Thin wrappers over the library (`dit_accel.planner.methods`, `dit_accel.planner.summary`, `dit_accel.planner.validate`);
every command that reports numbers takes `--json` and then prints one JSON object. Errors are one line on stderr with
exit code 2, and no output file is left behind (plans are written atomically, last).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import click

from dit_accel.harness.cli import (
    CONTEXT_SETTINGS,
    DEVICE,
    DTYPE,
    FRAMES,
    HEIGHT,
    JSON,
    MODEL,
    QUIET,
    WIDTH,
    OneLineErrorGroup,
    emit_report,
    guidance_option,
    printable,
    prompts_option,
    say,
    steps_option,
    user_errors,
    video_size,
)

#: The choices below are the library's (`planner.methods.METHODS`, `planner.labels.RULES`,
#: `planner.solver.GRANULARITIES`, `runtime.replay_table.REUSE_MODES`), spelled here so that `--help` imports no torch;
#: tests/test_cli_conventions.py checks that they agree.
METHOD_NAMES = ("profilingdit", "adacache", "bwcache", "unicp", "auto")
LABEL_RULES = ("threshold", "kmeans")
GRANULARITY_NAMES = ("block", "label", "stack")
REUSE_MODE_NAMES = ("hold", "extrapolate", "slope", "scale")


@click.group(cls=OneLineErrorGroup, invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Fit, inspect and validate acceleration plans from profiles."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command()
@click.argument("profiles", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Plan file to write.")
@click.option("--method", type=click.Choice(METHOD_NAMES), default="auto", show_default=True, help="Method preset.")
@click.option("--target-speedup", type=float, help="FLOP speedup to reach with the least predicted error.")
@click.option("--max-error", type=float, help="Predicted error not to exceed, with the most speedup.")
@click.option(
    "--pca-variance", type=float, default=0.95, show_default=True, help="q/k variance every head's PCA basis keeps."
)
@click.option("--warmup", type=int, help="Steps always computed at the start (method default).")
@click.option("--protect-last", type=int, help="Steps always computed at the end (method default).")
@click.option("--max-reuse", type=int, help="Longest run of reused steps (default steps/6).")
@click.option(
    "--foreground-weight", type=float, default=2.0, show_default=True, help="Error weight of foreground blocks."
)
@click.option(
    "--label-quantile",
    type=float,
    default=0.8,
    show_default=True,
    help="Attention quantile above which tokens are high-attention.",
)
@click.option("--label-rule", type=click.Choice(LABEL_RULES), default="threshold", show_default=True)
@click.option(
    "--label-threshold", type=float, help="Foreground score threshold (default 1.5 x chance; docs/methods.md)."
)
@click.option(
    "--refresh",
    type=click.Choice(("fixed", "decreasing")),
    help="profilingdit: refresh background blocks at a fixed interval (default, the paper's code) or a decreasing one.",
)
@click.option(
    "--max-cache-tensors",
    type=click.IntRange(min=1),
    help="unicp: at most N cached residual tensors per CFG branch (adjacent blocks share windows; see inspect).",
)
@click.option(
    "--cache-level",
    type=click.Choice(("attention", "block")),
    help="unicp: reuse cells cache the self-attention output (attention: the block runs, only its self-attention is "
    "skipped) or the whole block's residual (block). Default: docs/methods.md.",
)
@click.option("--moreg/--no-moreg", default=True, show_default=True, help="AdaCache motion regularisation.")
@click.option(
    "--probe",
    type=click.Choice(("mid", "correlated")),
    help="adacache: probe the mid-depth block (default, the paper's code) or the one best tracking the stack's drift.",
)
@click.option("--prune", is_flag=True, help="auto: allow PCAS prune steps (unicp always prunes).")
@click.option(
    "--granularity",
    type=click.Choice(GRANULARITY_NAMES),
    default="stack",
    show_default=True,
    help="auto: which blocks share one schedule.",
)
@click.option(
    "--reuse",
    type=click.Choice(REUSE_MODE_NAMES),
    help=(
        "auto: reuse steps add the cached residual as it is (hold), moved along its slope by amounts fitted per run "
        "position (slope), scaled by gains fitted per step and run position (scale: the residual's magnitude shrinks "
        "over the steps), or one step along its slope (extrapolate: the v1 solver). Default: the best measured of "
        "hold, slope and scale (scale where the profile recorded stack_residual_sq)."
    ),
)
@click.option(
    "--front-blocks",
    type=click.IntRange(0),
    help="auto: reuse steps still compute this many leading blocks and reuse the rest (a corrector, like DBCache's "
    "Fn). Default: with the closed loop, the best measured of none, ~1/8 and ~1/4 of the stack; without it, none.",
)
@click.option(
    "--prune-time-ratio",
    type=click.FloatRange(min=0, min_open=True),
    help="Pruned / full attention wall time measured on the target device (the GPU suite's pruned-attention row); "
    "pruning is chosen only where that makes a block cheaper (>= 1: never). Default: FLOPs at the kernel rank.",
)
@click.option(
    "--refine-rounds",
    type=click.IntRange(0),
    help="auto, with the closed loop: rounds of measured local search after it (each moves one computed step by one "
    "or two steps, keeps the move that best lowers the worst-quarter measured error; 0: off). Default: 3.",
)
@click.option("--sign-key-file", help="Sign the plan with the secret key in this file (HMAC-SHA256).")
@click.option(
    "--closed-loop/--no-closed-loop",
    default=True,
    show_default=True,
    help="auto: replay the candidate schedules on the calibration prompts and keep the one that measures best "
    "(needs the profiled model: --model, or the embedded default model).",
)
@MODEL
@DEVICE
@DTYPE
@JSON
@QUIET
@user_errors
def fit(
    profiles: tuple[str, ...],
    output: str,
    sign_key_file: str | None,
    closed_loop: bool,
    model: str | None,
    device: str,
    dtype: str,
    as_json: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Fit a plan from one or more profiles of the same model.

    `auto` on profiles with measured reuse costs searches the exact least-cost schedule and, with the closed loop
    (default), measures its candidates on the calibration prompts and refines the best by measured local search: it
    refuses a plan that measures more than 3 dB worse than predicted, naming the next slower speedup that passes.
    Steps, guidance and video size are the profiles'.
    """
    from dit_accel.harness.checks import check_output_file
    from dit_accel.runtime.plan import read_key_file, save_plan

    from .closed_loop import load_closed_loop
    from .methods import FitOptions, fit_profiles
    from .profiles import load_profiles
    from .reuse_costs import REUSE_COST_FIELDS

    check_output_file(output)
    key = read_key_file(sign_key_file) if sign_key_file else None
    fit_options = FitOptions(**options)
    profile_set = load_profiles(list(profiles))
    loop = None
    if closed_loop and fit_options.method == "auto" and profile_set.has(*REUSE_COST_FIELDS):
        loop = load_closed_loop(profile_set, model, device, dtype, progress=not quiet)
        say("closed loop: replaying candidate schedules on the calibration prompts", quiet)
    plan = fit_profiles(profile_set, fit_options, loop)
    save_plan(plan, output, key=key)
    report = {
        "output": output,
        "method": options["method"],
        "policy": plan.policy,
        "predicted": plan.predicted,
        "labels": list(plan.labels),
        "spans": [list(s) for s in plan.spans],
        "target_note": plan.provenance.get("chosen", {}).get("target_note"),
    }
    emit_report(report, as_json, _render_fit)


def _render_fit(report: dict[str, Any]) -> str:
    predicted = report["predicted"]
    line = (
        f"wrote {report['output']}: method {report['method']}, policy {report['policy']['kind']}, predicted speedup "
        f"{predicted['speedup']:.2f}x, compute fraction {predicted['compute_fraction']:.2f}, error "
        f"{predicted['error']:.4g}"
    )
    if report.get("target_note"):
        line += f"\nnote: {report['target_note']}"
    spread = predicted.get("step_speedup_range")
    if spread:
        line += (
            f"\nadaptive: each prompt decides its own steps; one run's speedup ranged {spread[0]:.2f}x to "
            f"{spread[1]:.2f}x on the {predicted['simulated_runs']} calibration prompt(s) (the prediction is their "
            "mean) and other prompts can fall outside that range: dit-plan validate measures them"
        )
    loop = predicted.get("closed_loop")
    if loop:
        line += (
            f"\nclosed loop on {loop['prompts']} calibration prompt(s), {len(loop['candidates'])} candidate(s): "
            f"measured error worst {loop['measured_worst']:.4g}, mean {loop['measured_mean']:.4g}"
        )
        refinement = loop.get("refinement")
        if refinement:
            line += (
                f"\nrefinement: {refinement['rounds']} move(s) kept of {refinement['tried']} tried, "
                f"{loop['generations']} generations in all"
            )
    return line


@main.command()
@click.argument("plan_path")
@click.option(
    "--plot", help="Write the plan's figures (drift, schedule, labels, PCA) to this image file (.png, .svg, .pdf, …)."
)
@click.option("--key-file", help="Refuse the plan unless it is signed with the secret key in this file.")
@JSON
@user_errors
def inspect(plan_path: str, plot: str | None, key_file: str | None, as_json: bool) -> None:
    """Show a plan: schedule grid, labels, spans, prediction and provenance."""
    from dit_accel.harness.checks import check_image_file
    from dit_accel.runtime.plan import load_plan, read_key_file

    from .plots import plan_figure, save_figure
    from .summary import plan_report, provenance_drift

    if plot:
        check_image_file(plot)
    plan = load_plan(plan_path, key=read_key_file(key_file) if key_file else None)
    report = plan_report(plan)
    if key_file:
        report["signature"] = "verified"
    if plot:
        drift, note = provenance_drift(plan)
        report["plot"] = str(save_figure(plan_figure(plan, drift), plot))
        report["plot_note"] = note
    emit_report(report, as_json, _render_inspect)


def _render_inspect(report: dict[str, Any]) -> str:
    from .summary import render_report

    text = render_report(report)
    if "signature" in report:
        text += "\nsignature: verified with the key file"
    if "plot" in report:
        note = f" ({printable(report['plot_note'])})" if report["plot_note"] else ""
        text += f"\nfigure written to {printable(report['plot'])}{note}"
    return text


@main.command()
@click.argument("plan_path")
@prompts_option(what="Held-out prompts")
@MODEL
@DEVICE
@DTYPE
@steps_option(source="the plan's; the runtime remaps a plan within [N/2, 2N]")
@guidance_option(source="the plan's profile's, else 5")
@FRAMES
@HEIGHT
@WIDTH
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed repeats per prompt and variant.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Added to every prompt's seed (a .txt file's prompts have seeds 0, 1, …; .jsonl lines may give their own).",
)
@click.option(
    "--flops/--no-flops", default=True, show_default=True, help="Count FLOPs of the first prompt (two extra runs)."
)
@click.option("--min-psnr", type=float, help="Tighten the plan until every prompt reaches this PSNR (dB).")
@click.option("-o", "--output", help="Where to write the tightened plan (with --min-psnr).")
@click.option("--key-file", help="Refuse the plan unless signed with the key in this file; sign the tightened plan.")
@JSON
@QUIET
@user_errors
def validate(
    plan_path: str,
    prompts_path: str,
    model: str | None,
    device: str,
    dtype: str,
    steps: int | None,
    guidance: float | None,
    frames: int | None,
    height: int | None,
    width: int | None,
    min_psnr: float | None,
    output: str | None,
    key_file: str | None,
    seed: int,
    as_json: bool,
    quiet: bool,
    **settings: Any,
) -> None:
    """Measure a plan against the full model on held-out prompts; with --min-psnr, tighten it and write it.

    The video size defaults to the one the plan's profile was recorded at.
    """
    from dit_accel.harness.checks import check_output_file, check_prompts
    from dit_accel.harness.pipelines import load_pipeline
    from dit_accel.harness.prompts import read_prompt_file
    from dit_accel.runtime.plan import load_plan, read_key_file

    from .errors import PlannerError
    from .validate import PipelineRunner, profiled_generation

    if (min_psnr is None) != (output is None):
        raise PlannerError("--min-psnr and -o go together: the tightened plan needs a file to go to")
    if output is not None:
        check_output_file(output)
    key = read_key_file(key_file) if key_file else None
    plan = load_plan(plan_path, key=key)
    specs = read_prompt_file(prompts_path)
    profiled_scale, size = profiled_generation(plan)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    check_prompts(pipe, specs, prompts_path)
    scale = profiled_scale if guidance is None else guidance
    runner = PipelineRunner(pipe, guidance_scale=scale, size={**size, **video_size(frames, height, width)})
    shifted = [replace(spec, seed=spec.seed + seed) for spec in specs]
    emit_report(
        _validate(plan, runner, shifted, min_psnr, output, key, steps, not quiet, settings), as_json, _render_validation
    )


def _validate(
    plan: Any,
    runner: Any,
    prompts: list[Any],
    min_psnr: float | None,
    output: str | None,
    key: bytes | None,
    steps: int | None,
    progress: bool,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The validation report; with `min_psnr`, tighten the plan, write it to `output` and report every round."""
    from dit_accel.runtime.plan import save_plan

    from .validate import tighten_plan, validate_plan

    settings = {**settings, "steps": steps, "progress": progress}
    if min_psnr is None:
        return validate_plan(plan, runner, prompts, **settings).to_json()
    tightened, reports = tighten_plan(plan, runner, prompts, min_psnr, **settings)
    save_plan(tightened, output, key=key)
    return {
        **reports[-1].to_json(),
        "output": output,
        "rounds": len(reports),
        "predicted": tightened.predicted,
        "history": [
            {"min_psnr": r.to_json()["min_psnr"], "wall_speedup": r.wall_speedup, "predicted_error": r.predicted_error}
            for r in reports
        ],
    }


def _render_validation(report: dict[str, Any]) -> str:
    from .validate import render_validation

    return render_validation(report)


@main.command("export-onnx")
@click.argument("plan_path")
@MODEL
@DEVICE
@DTYPE
@FRAMES
@HEIGHT
@WIDTH
@click.option(
    "-o", "--output", required=True, help="Folder to write: graphs, weights.bin, manifest.json (replaced atomically)."
)
@click.option(
    "--prompt",
    help="Prompt of the example call that fixes the graphs' input shapes (default: a default-model caption).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace -o even if it is a folder with other files (atomically; never the current folder or one that holds "
    "the plan).",
)
@click.option("--ignore-model-check", is_flag=True, help="Export a plan fitted on another model config (unsafe).")
@JSON
@QUIET
@user_errors
def export_onnx_command(
    plan_path: str,
    model: str | None,
    device: str,
    dtype: str,
    frames: int | None,
    height: int | None,
    width: int | None,
    output: str,
    prompt: str | None,
    force: bool,
    ignore_model_check: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Export the transformer with a static plan folded in: one ONNX graph per distinct per-step action set.

    Residual caches are explicit graph inputs/outputs; manifest.json maps steps to graphs. Replay it with
    dit_accel.export.driver (onnxruntime, no PyTorch) or build TensorRT engines from the graphs. OUTPUT must be a
    new or empty folder, or an earlier export, which is replaced only once the new one is complete (--force: any
    folder). Steps are the plan's; guidance is the driver's argument; the video size defaults to the profile's.
    """
    from dit_accel.export.exporter import EXAMPLE_PROMPT, check_export_destination, check_exportable, export_onnx
    from dit_accel.harness.checks import check_prompts
    from dit_accel.harness.pipelines import load_pipeline
    from dit_accel.harness.prompts import PromptSpec
    from dit_accel.runtime.plan import load_plan

    from .validate import profiled_generation

    check_export_destination(output, inputs=(plan_path,), replace=force)
    plan = load_plan(plan_path)
    check_exportable(plan)
    _, size = profiled_generation(plan)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    prompt = prompt or EXAMPLE_PROMPT
    check_prompts(pipe, [PromptSpec(prompt)], "--prompt")
    with _graph_progress(disable=as_json or quiet) as progress:
        manifest = export_onnx(
            pipe,
            plan,
            output,
            prompt,
            size={**size, **video_size(frames, height, width)},
            force=ignore_model_check,
            replace=force,
            progress=progress,
        )
    report = {
        "output": output,
        "graphs": len(manifest["graphs"]),
        "steps": len(manifest["steps"]),
        "graph_steps": [sum(s["graph"] == i for s in manifest["steps"]) for i in range(len(manifest["graphs"]))],
        "actions": [g["actions"] for g in manifest["graphs"]],
    }
    emit_report(report, as_json, _render_export)


@contextlib.contextmanager
def _graph_progress(disable: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over exported graphs, as the `progress(done, total)` callback `export_onnx` calls."""
    from tqdm.auto import tqdm

    with tqdm(total=None, desc="exporting graphs", unit="graph", disable=disable) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield progress


def _render_export(report: dict[str, Any]) -> str:
    lines = [f"wrote {report['graphs']} graph(s) for {report['steps']} steps to {report['output']}"]
    for index, (actions, count) in enumerate(zip(report["actions"], report["graph_steps"])):
        lines.append(f"  graph_{index}.onnx  {count:3d} steps  {' '.join(a[0].upper() for a in actions)}")
    return "\n".join(lines)
