"""`dit-profile`: record per-block, per-timestep behaviour of a video DiT into an HDF5 profile.

A thin click wrapper over `dit_accel.profiler.run`; every user mistake ends as one `error: …` line and exit code 2.
"""

from __future__ import annotations

import os
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
    prompts_option,
    steps_option,
    user_errors,
    video_size,
)


class _DefaultToRun(OneLineErrorGroup):
    """`dit-profile --prompts P …` means `dit-profile run --prompts P …`; `dit-profile merge …` stays a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in CONTEXT_SETTINGS["help_option_names"]:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToRun, invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Profile a video diffusion transformer on calibration prompts into an HDF5 file.

    \b
    dit-profile --prompts P.txt -o profile.h5            # the embedded default model
    dit-profile --prompts P.jsonl -o wan.h5 --model ./Wan2.1-T2V-1.3B-Diffusers --dtype bfloat16 --device cuda
    torchrun --nproc_per_node 4 dit-profile --prompts P.txt -o wan.h5 …   # one shard per rank, merged at the end
    dit-profile merge a.h5 b.h5 -o all.h5
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _render(report: dict[str, Any]) -> str:
    return (
        f"profiled {report['prompts_profiled']} prompt(s) ({report['prompts_skipped']} already complete) into "
        f"{report['output']}\n"
        f"time: {report['seconds']:.1f} s ({report['seconds_per_prompt']:.1f} s per prompt); "
        f"file: {report['file_bytes'] / 1e6:.2f} MB ({report['bytes_per_prompt'] / 1e6:.2f} MB per prompt)"
    )


@main.command("run", context_settings=CONTEXT_SETTINGS)
@prompts_option(what="Calibration prompts")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HDF5 profile to write.")
@MODEL
@DEVICE
@DTYPE
@steps_option(default=50)
@guidance_option(default=5.0, note="; <= 1 records the cond branch only")
@FRAMES
@HEIGHT
@WIDTH
@click.option(
    "--attention-every",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Record attention maps and PCA features every N steps.",
)
@click.option(
    "--query-samples", default=64, show_default=True, type=click.IntRange(1), help="Queries sampled per attention map."
)
@click.option(
    "--cross-tokens",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Text tokens kept in cross-attention maps.",
)
@click.option(
    "--feature-samples",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Query/key samples per block per prompt for PCA.",
)
@click.option("--no-attention", is_flag=True, help="Do not record attention maps.")
@click.option("--no-features", is_flag=True, help="Do not record PCA feature samples.")
@click.option(
    "--sensitivity-steps",
    default=6,
    show_default=True,
    type=click.IntRange(0),
    help=(
        "Steps at which to measure what reusing the whole stack does to the final latent (one generation each; 0: off)."
    ),
)
@click.option(
    "--sensitivity-prompts",
    default=1,
    show_default=True,
    type=click.IntRange(0),
    help="How many of the first prompts get the step-sensitivity measurement.",
)
@click.option(
    "--reuse-lags",
    default=8,
    show_default=True,
    type=click.IntRange(0, 32),
    help="Longest reuse run whose measured cost is recorded (whole stack; 0: off). dit-plan's auto needs it.",
)
@click.option("--resume", is_flag=True, help="Complete an interrupted profile (same model and options).")
@JSON
@QUIET
@user_errors
def run_command(
    prompts_path: str,
    output: str,
    model: str | None,
    device: str,
    dtype: str,
    steps: int,
    guidance: float,
    frames: int | None,
    height: int | None,
    width: int | None,
    attention_every: int,
    query_samples: int,
    cross_tokens: int,
    feature_samples: int,
    no_attention: bool,
    no_features: bool,
    sensitivity_steps: int,
    sensitivity_prompts: int,
    reuse_lags: int,
    resume: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Profile the calibration prompts of --prompts into the HDF5 file -o.

    Every prompt is checked against the model's tokenizer before the first one is profiled.
    """
    from dit_accel.harness.checks import check_output_file, check_prompts
    from dit_accel.harness.pipelines import load_pipeline
    from dit_accel.harness.prompts import read_prompt_file

    from .recorder import RecordSettings
    from .run import profile_distributed

    specs = read_prompt_file(prompts_path)
    check_output_file(output)
    settings = RecordSettings(
        num_inference_steps=steps,
        guidance_scale=guidance,
        attention_every=attention_every,
        query_samples=query_samples,
        cross_tokens=cross_tokens,
        feature_samples=feature_samples,
        record_attention=not no_attention,
        record_features=not no_features,
        sensitivity_steps=sensitivity_steps,
        sensitivity_prompts=sensitivity_prompts,
        reuse_lags=reuse_lags,
    )
    size = video_size(frames, height, width)
    _init_distributed(device)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    check_prompts(pipe, specs, prompts_path)
    summary = profile_distributed(pipe, specs, output, settings, size=size, resume=resume, progress=not quiet)
    emit_report(summary.to_json(), as_json, _render)


@main.command("merge", context_settings=CONTEXT_SETTINGS)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Merged profile to write.")
@user_errors
def merge_command(inputs: tuple[str, ...], output: str) -> None:
    """Merge profiles (e.g. per-rank shards) of the same model and settings into one file."""
    from dit_accel.harness.checks import check_output_file

    from .run import merge_profiles

    check_output_file(output)
    count = merge_profiles(list(inputs), output)
    click.echo(f"merged {count} prompt(s) from {len(inputs)} file(s) into {output}")


def _init_distributed(device: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); nothing when run alone."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
