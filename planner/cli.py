"""dit-plan: fit plans from profiles, inspect them, validate (and tighten) them on held-out prompts.

Thin wrappers over the library (`dit_accel.planner.methods`, `dit_accel.planner.summary`, `dit_accel.planner.validate`);
every command that reports numbers takes `--json` and then prints one JSON object. Errors are one line on stderr with
exit code 2, and no output file is left behind (plans are written atomically, last).
"""

from __future__ import annotations

from typing import Any

import click
from tqdm.auto import tqdm

from dit_accel.export.exporter import EXAMPLE_PROMPT, check_export_destination, check_exportable, export_onnx
from dit_accel.harness.cli import DEVICE, DTYPE, MODEL, OneLineErrorGroup, emit_report, printable, user_errors
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import read_prompt_file
from dit_accel.runtime.plan import load_plan, read_key_file, save_plan
from dit_accel.runtime.replay_table import REUSE_MODES

from .closed_loop import load_closed_loop
from .errors import PlannerError
from .labels import RULES
from .methods import METHODS, FitOptions, fit_profiles
from .plots import plan_figure, save_figure
from .profiles import load_profiles
from .reuse_costs import REUSE_COST_FIELDS
from .solver import GRANULARITIES
from .summary import plan_report, provenance_drift, render_report
from .validate import PipelineRunner, profiled_generation, render_validation, tighten_plan, validate_plan


@click.group(cls=OneLineErrorGroup, invoke_without_command=True)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Fit, inspect and validate acceleration plans from profiles."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command()
@click.argument("profiles", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Plan file to write.")
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True, help="Method preset.")
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
@click.option("--label-rule", type=click.Choice(RULES), default="threshold", show_default=True)
@click.option(
    "--label-threshold", type=float, help="Foreground score threshold (default half-way between chance and 1)."
)
@click.option("--moreg/--no-moreg", default=True, show_default=True, help="AdaCache motion regularisation.")
@click.option("--prune", is_flag=True, help="auto: allow PCAS prune steps (unicp always prunes).")
@click.option(
    "--granularity",
    type=click.Choice(GRANULARITIES),
    default="stack",
    show_default=True,
    help="auto: which blocks share one schedule.",
)
@click.option(
    "--reuse",
    type=click.Choice(REUSE_MODES),
    help=(
        "auto: reuse steps add the cached residual as it is (hold), moved along its slope by amounts fitted per run "
        "position (slope), or one step along it (extrapolate: the v1 solver). Default: the best measured of hold and "
        "slope."
    ),
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
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
    **options: Any,
) -> None:
    """Fit a plan from one or more profiles of the same model.

    `auto` on profiles with measured reuse costs searches the exact least-cost schedule and, with the closed loop
    (default), measures its candidates on the calibration prompts: it refuses a plan that measures more than 3 dB
    worse than predicted, naming the speedup that passes.
    """
    key = read_key_file(sign_key_file) if sign_key_file else None
    fit_options = FitOptions(**options)
    profile_set = load_profiles(list(profiles))
    loop = None
    if closed_loop and fit_options.method == "auto" and profile_set.has(*REUSE_COST_FIELDS):
        loop = load_closed_loop(profile_set, model, device, dtype)
    plan = fit_profiles(profile_set, fit_options, loop)
    save_plan(plan, output, key=key)
    report = {
        "output": output,
        "method": options["method"],
        "policy": plan.policy,
        "predicted": plan.predicted,
        "labels": list(plan.labels),
        "spans": [list(s) for s in plan.spans],
    }
    emit_report(report, as_json, _render_fit)


def _render_fit(report: dict[str, Any]) -> str:
    predicted = report["predicted"]
    line = (
        f"wrote {report['output']}: method {report['method']}, policy {report['policy']['kind']}, predicted speedup "
        f"{predicted['speedup']:.2f}x, compute fraction {predicted['compute_fraction']:.2f}, error "
        f"{predicted['error']:.4g}"
    )
    loop = predicted.get("closed_loop")
    if loop:
        line += (
            f"\nclosed loop on {loop['prompts']} calibration prompt(s), {len(loop['candidates'])} candidate(s): "
            f"measured error worst {loop['measured_worst']:.4g}, mean {loop['measured_mean']:.4g}"
        )
    return line


@main.command()
@click.argument("plan_path")
@click.option("--plot", help="Write the plan's figures (drift, schedule, labels, PCA) to this image file.")
@click.option("--key-file", help="Refuse the plan unless it is signed with the secret key in this file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def inspect(plan_path: str, plot: str | None, key_file: str | None, as_json: bool) -> None:
    """Show a plan: schedule grid, labels, spans, prediction and provenance."""
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
    text = render_report(report)
    if "signature" in report:
        text += "\nsignature: verified with the key file"
    if "plot" in report:
        note = f" ({printable(report['plot_note'])})" if report["plot_note"] else ""
        text += f"\nfigure written to {printable(report['plot'])}{note}"
    return text


@main.command()
@click.argument("plan_path")
@click.option("--prompts", "prompts_path", required=True, help="Held-out prompts, one per line.")
@click.option("--model", "model_path", help="Local pipeline folder (default: the embedded default model).")
@click.option("--steps", type=int, help="Inference steps (default: the plan's; the runtime remaps within [N/2, 2N]).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed repeats per prompt and variant.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first prompt (then +1 per prompt).")
@click.option(
    "--guidance-scale", type=float, help="CFG scale (default: the profile's, else 5); size is the profile's too."
)
@click.option(
    "--flops/--no-flops", default=True, show_default=True, help="Count FLOPs of the first prompt (two extra runs)."
)
@click.option("--min-psnr", type=float, help="Tighten the plan until every prompt reaches this PSNR (dB).")
@click.option("-o", "--output", help="Where to write the tightened plan (with --min-psnr).")
@click.option("--key-file", help="Refuse the plan unless signed with the key in this file; sign the tightened plan.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def validate(
    plan_path: str,
    prompts_path: str,
    model_path: str | None,
    steps: int | None,
    repeats: int,
    seed: int,
    guidance_scale: float | None,
    flops: bool,
    min_psnr: float | None,
    output: str | None,
    key_file: str | None,
    as_json: bool,
) -> None:
    """Measure a plan against the full model on held-out prompts; with --min-psnr, tighten it and write it."""
    if (min_psnr is None) != (output is None):
        raise PlannerError("--min-psnr and -o go together: the tightened plan needs a file to go to")
    key = read_key_file(key_file) if key_file else None
    plan = load_plan(plan_path, key=key)
    prompts = [spec.prompt for spec in read_prompt_file(prompts_path)]
    profiled_scale, size = profiled_generation(plan)
    scale = profiled_scale if guidance_scale is None else guidance_scale
    runner = PipelineRunner(load_pipeline(model_path), guidance_scale=scale, size=size)
    settings = {"steps": steps, "repeats": repeats, "seed": seed, "flops": flops}
    if min_psnr is None:
        emit_report(validate_plan(plan, runner, prompts, **settings).to_json(), as_json, render_validation)
        return
    tightened, reports = tighten_plan(plan, runner, prompts, min_psnr, **settings)
    save_plan(tightened, output, key=key)
    report = {
        **reports[-1].to_json(),
        "output": output,
        "rounds": len(reports),
        "predicted": tightened.predicted,
        "history": [
            {"min_psnr": r.to_json()["min_psnr"], "wall_speedup": r.wall_speedup, "predicted_error": r.predicted_error}
            for r in reports
        ],
    }
    emit_report(report, as_json, render_validation)


@main.command("export-onnx")
@click.argument("plan_path")
@click.option("--model", "model_path", help="Local pipeline folder (default: the embedded default model).")
@click.option(
    "-o", "--output", required=True, help="Folder to write: graphs, weights.bin, manifest.json (replaced atomically)."
)
@click.option(
    "--prompt",
    default=EXAMPLE_PROMPT,
    show_default=True,
    help="Prompt of the example call that fixes the graphs' input shapes.",
)
@click.option("--force", is_flag=True, help="Export a plan fitted on another model config (unsafe).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def export_onnx_command(
    plan_path: str, model_path: str | None, output: str, prompt: str, force: bool, as_json: bool
) -> None:
    """Export the transformer with a static plan folded in: one ONNX graph per distinct per-step action set.

    Residual caches are explicit graph inputs/outputs; manifest.json maps steps to graphs. Replay it with
    dit_accel.export.driver (onnxruntime, no PyTorch) or build TensorRT engines from the graphs. OUTPUT must be a
    new or empty folder, or an earlier export, which is replaced only once the new one is complete.
    """
    check_export_destination(output)
    plan = load_plan(plan_path)
    check_exportable(plan)
    _, size = profiled_generation(plan)
    pipe = load_pipeline(model_path)
    with tqdm(total=None, desc="exporting graphs", unit="graph", disable=as_json) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        manifest = export_onnx(pipe, plan, output, prompt, size=size, force=force, progress=progress)
    report = {
        "output": output,
        "graphs": len(manifest["graphs"]),
        "steps": len(manifest["steps"]),
        "graph_steps": [sum(s["graph"] == i for s in manifest["steps"]) for i in range(len(manifest["graphs"]))],
        "actions": [g["actions"] for g in manifest["graphs"]],
    }
    emit_report(report, as_json, _render_export)


def _render_export(report: dict[str, Any]) -> str:
    lines = [f"wrote {report['graphs']} graph(s) for {report['steps']} steps to {report['output']}"]
    for index, (actions, count) in enumerate(zip(report["actions"], report["graph_steps"])):
        lines.append(f"  graph_{index}.onnx  {count:3d} steps  {' '.join(a[0].upper() for a in actions)}")
    return "\n".join(lines)
