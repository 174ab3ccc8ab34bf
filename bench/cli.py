"""`dit-bench`: plans against diffusers' own caches, on the same prompts and seeds, in one process.

A thin click wrapper over `dit_accel.bench.runner` and `dit_accel.bench.report`. Usage errors and bad input are one
`error: …` line on stderr with exit code 2, and nothing is written under --out.

    dit-bench --out artifacts/bench                                   # default model, peers only
    dit-bench --profile calib.h5 --fit --out artifacts/bench          # + auto at several budgets and every preset
    dit-bench --plan a.plan --plan b.plan --peers fbc,magcache --thresholds magcache=0.05,0.1
    dit-bench --random-config wan-1.3b --device cuda --dtype bfloat16 --steps 50 --frames 33   # speed only

The library is imported inside `main`, so that `dit-bench --help` does not import torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from dit_accel.harness.cli import (
    CONTEXT_SETTINGS,
    DEVICE,
    DTYPE,
    FRAMES,
    HEIGHT,
    MODEL,
    QUIET,
    WIDTH,
    OneLineErrorCommand,
    guidance_option,
    prompts_option,
    steps_option,
    user_errors,
    video_size,
)

from .errors import BenchError

#: The library's names (`models.RANDOM_CONFIGS`, `peers.PEERS`, `variants.FIT_PRESETS`, `runner.DEFAULT_BUDGETS`),
#: spelled here so that `--help` imports no torch; tests/test_cli_conventions.py checks that they agree.
RANDOM_CONFIG_NAMES = ("wan-1.3b",)
PEER_NAMES = ("fbc", "taylorseer", "magcache", "seacache", "pab", "fastercache")
FIT_PRESET_NAMES = ("profilingdit", "adacache", "bwcache", "unicp")
DEFAULT_BUDGET_VALUES = (1.5, 2.0, 3.0)


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise click.BadParameter(f"{what} is empty")
    return values


def _parse_budgets(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    return None if value is None else _numbers(value, "--budgets")


def _parse_presets(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in FIT_PRESET_NAMES]
    if unknown:
        raise click.BadParameter(f"unknown preset {unknown[0]!r} (known: {', '.join(FIT_PRESET_NAMES)}, or none)")
    return names


def _parse_peers(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise click.BadParameter(f"unknown peer {unknown[0]!r} (known: {', '.join(PEER_NAMES)})")
    return names


def _parse_thresholds(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, tuple[float, ...]]:
    grids = {}
    for item in value:
        name, _, numbers = item.partition("=")
        if name.strip() not in PEER_NAMES or not numbers:
            raise click.BadParameter(f"expected PEER=V1,V2,… with PEER one of {', '.join(PEER_NAMES)}, got {item!r}")
        grids[name.strip()] = _numbers(numbers, f"--thresholds {name.strip()}")
    return grids


def check_output_dir(out: str) -> None:
    """Refuse early an --out that is a file or whose nearest existing parent is not a writable folder."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise BenchError(f"--out {out} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise BenchError(f"--out {out}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK):
        raise BenchError(f"--out {out}: folder {existing} is not writable")


@click.command(cls=OneLineErrorCommand, context_settings=CONTEXT_SETTINGS)
@click.option(
    "--out",
    default="artifacts/bench",
    show_default=True,
    type=click.Path(),
    help="Folder for bench.md, bench.json, pareto.png (and fitted plans).",
)
@MODEL
@click.option(
    "--random-config",
    type=click.Choice(sorted(RANDOM_CONFIG_NAMES)),
    help="Full-size architecture with random weights (speed only).",
)
@click.option(
    "--plan", "plans", multiple=True, type=click.Path(dir_okay=False), help="A .plan file to benchmark (repeatable)."
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Profile(s) for --fit; their prompts also calibrate MagCache.",
)
@click.option("--fit", is_flag=True, help="Fit auto at every --budgets value and each method preset from --profile.")
@click.option(
    "--budgets",
    callback=_parse_budgets,
    help=f"FLOP speedups to fit auto at [default: {','.join(map(str, DEFAULT_BUDGET_VALUES))}; 2 with --quick].",
)
@click.option(
    "--presets",
    callback=_parse_presets,
    help=f"Method presets to fit at their defaults, or none [default: {','.join(FIT_PRESET_NAMES)}; none: --quick].",
)
@click.option(
    "--peers",
    default=",".join(PEER_NAMES),
    show_default=True,
    callback=_parse_peers,
    help="diffusers caches to compare with.",
)
@click.option(
    "--thresholds", multiple=True, callback=_parse_thresholds, help="PEER=V1,V2,… replaces a peer's grid (repeatable)."
)
@click.option("--quick", is_flag=True, help="Reduced grid: one value per peer, auto at 2x, no presets (unless given).")
@prompts_option(required=False, what="Benchmark prompts (default: twelve held-out captions of the default model)")
@click.option(
    "--calibration-prompts",
    type=click.Path(dir_okay=False),
    help="MagCache calibration prompts (default: the --profile prompts, else built-in ones).",
)
@steps_option(source="the profile's, else the plan's, else 20")
@click.option(
    "--repeats",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Interleaved timed rounds; the median is reported.",
)
@guidance_option(source="the profile's, else 5")
@FRAMES
@HEIGHT
@WIDTH
@DEVICE
@DTYPE
@click.option(
    "--lpips-weights",
    type=click.Path(dir_okay=False),
    help="TorchScript LPIPS module (model(x, y), images in [-1, 1]); no download.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the markdown table.")
@QUIET
@user_errors
def main(
    out: str,
    prompts_path: str | None,
    frames: int | None,
    height: int | None,
    width: int | None,
    as_json: bool,
    quiet: bool,
    thresholds: dict[str, tuple[float, ...]],
    **options: Any,
) -> None:
    """Benchmark plans and diffusers' caches against the un-accelerated pipeline (same prompts, seeds, process)."""
    from .report import build_report, pareto_png, render_markdown, to_json, write_outputs
    from .runner import BenchOptions, run_bench, summarise

    unselected = sorted(set(thresholds) - set(options["peers"]))
    if unselected:
        raise BenchError(f"--thresholds names {unselected[0]}, which --peers leaves out")
    check_output_dir(out)
    size = video_size(frames, height, width)
    if prompts_path is not None:
        _check_prompts_file(prompts_path, options["model"], options["random_config"])
    bench = BenchOptions(
        **{**options, "plans": tuple(options["plans"]), "profiles": tuple(options["profiles"])},
        prompts=prompts_path,
        thresholds=thresholds,
        size=size,
        progress=not quiet,
    )
    run = run_bench(bench)
    report = build_report(summarise(run))
    markdown = render_markdown(report)
    files = {"bench.md": markdown.encode(), "bench.json": to_json(report).encode(), "pareto.png": pareto_png(report)}
    files.update(_fitted_plan_files(run))
    written = write_outputs(out, files)
    click.echo(
        to_json(report) if as_json else markdown + "\nwrote " + ", ".join(str(p) for p in written), nl=not as_json
    )


def _fitted_plan_files(run: Any) -> dict[str, bytes]:
    """The plans `--fit` made, so every row can be replayed."""
    from dit_accel.runtime.plan import plan_to_bytes

    return {v.plan_file: plan_to_bytes(v.plan) for v in run.variants if v.plan_file is not None}


def _check_prompts_file(path: str, model: str | None, random_config: str | None) -> None:
    """Refuse up front a prompt the embedded default model's tokenizer refuses (when that is the model benchmarked)."""
    if model is not None or random_config is not None:
        return
    from dit_accel.defaultmodel import WordTokenizer
    from dit_accel.harness.checks import check_texts
    from dit_accel.harness.prompts import read_prompt_file

    check_texts([WordTokenizer.from_package()], read_prompt_file(path), path)
