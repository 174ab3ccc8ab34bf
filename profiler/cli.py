"""`dit-profile`: record per-block, per-timestep behaviour of a video DiT into an HDF5 profile.

A thin click wrapper over `dit_accel.profiler.run`; every user mistake ends as one `error: …` line and exit code 2.
"""

from __future__ import annotations

import os
from typing import Any

import click

from dit_accel.harness.cli import (
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
    user_errors,
    video_size,
)
from dit_accel.harness.pipelines import load_pipeline
from dit_accel.harness.prompts import read_prompt_file

from .recorder import RecordSettings
from .run import check_output_location, merge_profiles, profile_distributed


class _DefaultToRun(OneLineErrorGroup):
    """`dit-profile PROMPTS …` means `dit-profile run PROMPTS …`; `dit-profile merge …` stays a subcommand."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args.insert(0, "run")
        return super().resolve_command(ctx, args)


@click.group(cls=_DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Profile a video diffusion transformer on calibration prompts into an HDF5 file.

    \b
    dit-profile PROMPTS.txt -o profile.h5            # the embedded default model
    dit-profile PROMPTS.jsonl -o wan.h5 --model ./Wan2.1-T2V-1.3B-Diffusers --dtype bfloat16 --device cuda
    torchrun --nproc_per_node 4 dit-profile PROMPTS.txt -o wan.h5 …   # one shard per rank, merged at the end
    dit-profile merge a.h5 b.h5 -o all.h5
    """


def _render(report: dict[str, Any]) -> str:
    return (
        f"profiled {report['prompts_profiled']} prompt(s) ({report['prompts_skipped']} already complete) into "
        f"{report['output']}\n"
        f"time: {report['seconds']:.1f} s ({report['seconds_per_prompt']:.1f} s per prompt); "
        f"file: {report['file_bytes'] / 1e6:.2f} MB ({report['bytes_per_prompt'] / 1e6:.2f} MB per prompt)"
    )


@main.command("run")
@click.argument("prompts", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HDF5 profile to write.")
@MODEL
@click.option("--steps", default=50, show_default=True, type=click.IntRange(2, 1000), help="Denoising steps.")
@click.option(
    "--guidance",
    default=5.0,
    show_default=True,
    type=float,
    help="Classifier-free guidance scale (<= 1 records the cond branch only).",
)
@FRAMES
@HEIGHT
@WIDTH
@DTYPE
@DEVICE
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
    prompts: str,
    output: str,
    model: str | None,
    steps: int,
    guidance: float,
    frames: int | None,
    height: int | None,
    width: int | None,
    dtype: str,
    device: str,
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
    """Profile the prompts of PROMPTS (.txt: one per line; .jsonl: prompt, negative_prompt, seed)."""
    specs = read_prompt_file(prompts)
    check_output_location(output)
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
    summary = profile_distributed(pipe, specs, output, settings, size=size, resume=resume, progress=not quiet)
    emit_report(summary.to_json(), as_json, _render)


@main.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Merged profile to write.")
@user_errors
def merge_command(inputs: tuple[str, ...], output: str) -> None:
    """Merge profiles (e.g. per-rank shards) of the same model and settings into one file."""
    count = merge_profiles(list(inputs), output)
    click.echo(f"merged {count} prompt(s) from {len(inputs)} file(s) into {output}")


def _init_distributed(device: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); nothing when run alone."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
