"""Every supported family through the command line, as a user runs it on a saved folder: `dit-profile run` →
`dit-plan fit` (`auto`, and one preset) → `dit-plan validate` of the `auto` plan.

One row per family, each at one guidance value: the rows alternate between CFG and CFG-free, so both regimes run
through the CLI, and the preset rotates, so each preset runs on several families. The Python rows
(`tests/test_models_matrix.py`, `tests/test_more_pipelines.py`, `tests/test_cosmos.py`) check each family's library
path bit for bit, most at both guidance values; Wan and CogVideoX also run the full CLI row there (closed-loop
`auto` and every preset).
To stay within the suite's time budget, these rows profile one prompt without the step-sensitivity runs, fit `auto`
without the closed loop, and validate on a second prompt (held out) with one repeat and no FLOP count.

Per row: the profile holds exactly the CFG branches the pipeline ran; `auto` writes a plan that reuses some block
calls and validates at a block-call speedup above 1 with a finite PSNR; the preset, at its own defaults, writes a plan
for the same model, or, where the row says so, is refused in one line on stderr with exit code 2 and no file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_more_pipelines import LTX2_EXTRA, LTX2_SIZE, QWEN_CFG, QWEN_SIZE
from tiny_cosmos import COSMOS_SIZE, cosmos2_text_to_image_pipeline
from tiny_models import PIPELINE_EXTRA, PIPELINE_SIZES, TINY_PIPELINES
from tiny_more_pipelines import ltx2_pipeline, qwen_image_pipeline

from dit_accel.planner.cli import main as plan_main
from dit_accel.profiler.cli import main as profile_main
from dit_accel.profiler.schema import open_profile
from dit_accel.runtime import REUSE, load_plan

STEPS = 6
#: The calibration prompt (profiled) and the held-out prompt (validated).
PROMPTS = [
    {"prompt": "a large red circle moves right on a blue background", "seed": 0},
    {"prompt": "a small white square moves up on a black background", "seed": 1},
]
#: Pipeline size keywords given as CLI options; any other size keyword (SanaVideo's `frames`) goes in a prompt's
#: `extra`, as a user of that pipeline would pass it.
SIZE_OPTIONS = {"num_frames": "--frames", "height": "--height", "width": "--width"}


@dataclass(frozen=True)
class Family:
    """How to build a family's tiny pipeline, its size keywords, and the `.jsonl` fields every prompt carries."""

    build: Callable[[], Any]
    size: dict[str, int]
    fields: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    **{
        name: Family(build, PIPELINE_SIZES[name], {"extra": PIPELINE_EXTRA[name]} if name in PIPELINE_EXTRA else {})
        for name, build in TINY_PIPELINES.items()
    },
    "cosmos": Family(cosmos2_text_to_image_pipeline, COSMOS_SIZE),
    "ltx2": Family(ltx2_pipeline, LTX2_SIZE, {"extra": LTX2_EXTRA}),
    "qwen_image": Family(qwen_image_pipeline, QWEN_SIZE, QWEN_CFG),
}
CFG, NO_CFG = ("cond", "uncond"), ("cond",)
#: (family, guidance, preset, CFG branches the profile must hold, the preset's one-line refusal or None when it
#: writes a plan). HunyuanVideo and Flux are guidance-distilled (one call per step at any guidance); Qwen-Image runs
#: CFG from `true_cfg_scale` and a negative prompt, not from guidance; an image has no motion for AdaCache's
#: regulariser.
CLI_ROWS = [
    ("cosmos", 1.0, "profilingdit", NO_CFG, None),
    ("flux", 1.0, "adacache", NO_CFG, "error: profile field motion holds non-finite values (videos of one frame"),
    ("hunyuan_video", 5.0, "bwcache", NO_CFG, None),
    ("ltx2", 4.0, "unicp", CFG, None),
    ("ltx_video", 1.0, "profilingdit", NO_CFG, None),
    ("mochi", 5.0, "adacache", CFG, None),
    ("qwen_image", 1.0, "unicp", CFG, None),
    ("sana_video", 1.0, "bwcache", NO_CFG, None),
    ("skyreels_v2", 5.0, "profilingdit", CFG, None),
    ("wan_vace", 1.0, "adacache", NO_CFG, None),
]


def _save(family: Family, tmp_path: Path) -> tuple[list[str], list[Path]]:
    """Save the family's tiny pipeline and write one `.jsonl` file per prompt; returns the model and size options
    and the prompt files."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    family.build().save_pretrained(folder)
    options = ["--model", str(folder), "--steps", str(STEPS)]
    extra = {}
    for key, value in family.size.items():
        if key in SIZE_OPTIONS:
            options += [SIZE_OPTIONS[key], str(value)]
        else:
            extra[key] = value
    files = []
    for index, prompt in enumerate(PROMPTS):
        fields = {**prompt, **family.fields}
        if extra:
            fields["extra"] = {**fields.get("extra", {}), **extra}
        files.append(tmp_path / f"prompt{index}.jsonl")
        files[-1].write_text(json.dumps(fields) + "\n")
    return options, files


@pytest.mark.parametrize(
    ("name", "guidance", "preset", "branches", "refusal"),
    CLI_ROWS,
    ids=[f"{r[0]}-cfg{r[1]:g}-{r[2]}" for r in CLI_ROWS],
)
def test_cli_profile_fit_validate(name, guidance, preset, branches, refusal, tmp_path):
    options, (calibration, held_out) = _save(FAMILIES[name], tmp_path)
    model = [*options, "--guidance", str(guidance), "--quiet"]
    runner = CliRunner()

    profile = tmp_path / "profile.h5"
    args = ["run", "--prompts", str(calibration), "-o", str(profile), "--sensitivity-steps", "0", *model]
    result = runner.invoke(profile_main, args)
    assert result.exit_code == 0, result.output
    assert open_profile(profile).header.branches == branches

    auto, other = tmp_path / "auto.plan", tmp_path / f"{preset}.plan"
    args = ["fit", str(profile), "--target-speedup", "1.5", "-o", str(auto), "--no-closed-loop", "--quiet"]
    result = runner.invoke(plan_main, args)
    assert result.exit_code == 0, result.output
    assert (load_plan(auto).actions == REUSE).any(), "a 1.5x plan reuses some block calls"
    result = runner.invoke(plan_main, ["fit", str(profile), "--method", preset, "-o", str(other), "--quiet"])
    if refusal is None:
        assert result.exit_code == 0, result.output
        assert load_plan(other).model == load_plan(auto).model
    else:
        assert result.exit_code == 2 and not other.exists(), result.output
        assert result.stderr.startswith(refusal) and result.stderr.count("\n") == 1, result.stderr

    args = ["validate", str(auto), "--prompts", str(held_out), "--repeats", "1", "--no-flops", "--json", *model]
    result = runner.invoke(plan_main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [p["seed"] for p in report["prompts"]] == [PROMPTS[1]["seed"]]
    assert report["block_call_speedup"] > 1.0 and math.isfinite(report["min_psnr"])


def test_quiet_refusal_after_loading_is_one_line(tmp_path):
    """`dit-profile run --quiet` on a prompt the loaded pipeline refuses (an `extra` keyword it does not take): exit
    code 2 and exactly one line on stderr, with no loading progress bars or warnings before it, and no file."""
    import warnings

    folder = tmp_path / "model"
    torch.manual_seed(0)
    TINY_PIPELINES["wan"]().save_pretrained(folder)
    prompts, profile = tmp_path / "prompts.jsonl", tmp_path / "profile.h5"
    prompts.write_text(json.dumps({**PROMPTS[0], "extra": {"not_a_keyword": 1}}) + "\n")
    args = ["run", "--prompts", str(prompts), "-o", str(profile), "--model", str(folder), "--steps", "2", "--quiet"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(profile_main, args)
    assert result.exit_code == 2 and not profile.exists(), result.output
    assert result.stderr == "error: WanPipeline takes no keyword 'not_a_keyword' (prompt 1)\n"
    assert [str(w.message) for w in caught] == []
