"""Cosmos: its pipelines call the transformer without a cache context, cond then uncond within one scheduler step.

The adapter's `call_order` names those calls (`runtime/call_order.py`). Checked on tiny Cosmos-Predict2
text-to-image and video-to-world and Cosmos 1 text-to-world pipelines saved with `save_pretrained` and loaded back:
the profile holds exactly the branches the pipeline ran (guidance 5 and 1), an all-compute plan reproduces the
vanilla latent bit for bit, the fitted caching plan skips exactly the planned block calls (counted by plain torch
pre-hooks on each block's self-attention, which a reused block never reaches), repeated runs under one plan agree,
and the CLI path (profile, fit auto, validate) works. A transformer that needs torchvision (`concat_padding_mask`,
as real checkpoints set it) is refused in one line where it is missing.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry
from tiny_cosmos import COSMOS_SIZE, save_tiny_cosmos
from tiny_models import count_computed

from dit_accel.harness.pipelines import generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner.methods import FitOptions, fit_plan
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts
from dit_accel.profiler.schema import open_profile
from dit_accel.runtime import REUSE, AdapterError, Plan, PlanError, apply_plan, fingerprint_model

STEPS = 6
PROMPTS = [
    PromptSpec("a large red circle moves right on a blue background", "", 0),
    PromptSpec("a small white square moves up on a black background", "", 1),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_cosmos(tmp_path_factory.mktemp("cosmos")))


def _run(pipe, guidance: float, spec: PromptSpec, size: dict) -> np.ndarray:
    with torch.no_grad():
        return generate(pipe, spec, STEPS, guidance, size, output_type="latent").numpy()


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg5", "cfg1"])
def test_profile_fit_apply(guidance, folder, tmp_path):
    _check_profile_fit_apply(load_pipeline(folder), PROMPTS, COSMOS_SIZE, guidance, tmp_path)


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg5", "cfg1"])
def test_video_to_world_profile_fit_apply(guidance, tmp_path):
    """Cosmos-Predict2's video-to-world pipeline, each prompt conditioned on an image from its `.jsonl`-style field."""
    from PIL import Image
    from tiny_cosmos import cosmos2_video_to_world_pipeline

    torch.manual_seed(0)
    cosmos2_video_to_world_pipeline().save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "first.png")
    prompts = [dataclasses.replace(p, image=str(tmp_path / "first.png")) for p in PROMPTS]
    size = {"num_frames": 5, **COSMOS_SIZE}  # two latent frames: the image's and one generated
    _check_profile_fit_apply(load_pipeline(str(tmp_path / "model")), prompts, size, guidance, tmp_path)


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg5", "cfg1"])
def test_text_to_world_profile_fit_apply(guidance, tmp_path):
    """Cosmos 1's text-to-world pipeline (EDM scheduler, its own VAE)."""
    from tiny_cosmos import cosmos_text_to_world_pipeline

    torch.manual_seed(0)
    cosmos_text_to_world_pipeline().save_pretrained(tmp_path / "model")
    size = {"num_frames": 5, **COSMOS_SIZE}
    _check_profile_fit_apply(load_pipeline(str(tmp_path / "model")), PROMPTS, size, guidance, tmp_path)


def _check_profile_fit_apply(pipe, prompts: list[PromptSpec], size: dict, guidance: float, tmp_path) -> None:
    """Profile, fit `auto`, and check branches, refusal of another model's plan, bit-identical all-compute replay,
    exact skips over two runs under one plan."""
    settings = RecordSettings(num_inference_steps=STEPS, guidance_scale=guidance, sensitivity_steps=0)
    path = tmp_path / "profile.h5"
    profile_prompts(pipe, prompts, path, settings, size=size, progress=False)
    expected = ("cond", "uncond") if guidance > 1.0 else ("cond",)
    profile = open_profile(path)
    assert profile.header.branches == expected
    drift = profile.stack("residual_rel_l1")
    assert drift.shape[:2] == (len(prompts), len(expected)) and np.isfinite(drift[:, :, 1:]).all()
    if guidance > 1.0:  # the two calls of a step were told apart: their inputs differ (other text), so their drift
        assert not np.array_equal(drift[:, 0], drift[:, 1])

    plan = fit_plan([str(path)], FitOptions(method="auto", target_speedup=1.5, warmup=1, protect_last=1))
    assert (plan.actions == REUSE).any(), "a 1.5x plan reuses some block calls"
    from tiny_models import tiny_wan

    with pytest.raises(PlanError, match="plan is for transformer class"):
        apply_plan(pipe, Plan.all_compute(fingerprint_model(tiny_wan()), plan.timesteps))
    vanilla = _run(pipe, guidance, prompts[0], size)
    with apply_plan(pipe, Plan.all_compute(plan.model, plan.timesteps)):
        assert np.array_equal(_run(pipe, guidance, prompts[0], size), vanilla)

    counts, calls, handles = count_computed(pipe.transformer)
    try:
        with apply_plan(pipe, plan):
            cached = _run(pipe, guidance, prompts[0], size)
            again = _run(pipe, guidance, prompts[0], size)
    finally:
        for handle in handles:
            handle.remove()
    calls_per_step = len(expected)
    assert calls[0] == 2 * calls_per_step * STEPS
    assert counts == [2 * calls_per_step * int((row != REUSE).sum()) for row in plan.actions]
    assert np.isfinite(cached).all() and not np.array_equal(cached, vanilla)
    assert np.array_equal(again, cached), "a second run under the same plan starts from step 0 again"


def test_transformer_alone_is_refused_and_extra_calls_are_named(folder):
    """Without the pipeline's scheduler the unnamed calls cannot be placed: refused in one line, nothing installed.
    A pipeline that makes more calls per step than the adapter names is refused in one line, not misattributed."""
    pipe = load_pipeline(folder)
    transformer = pipe.transformer
    plan = Plan.all_compute(fingerprint_model(transformer), [float(t) for t in range(1000, 0, -1000 // STEPS)])
    with pytest.raises(AdapterError, match=r"name no CFG branch.*pass the pipeline, not the transformer alone$"):
        apply_plan(transformer, plan)
    assert not HookRegistry.check_if_exists_or_initialize(transformer).hooks, "nothing installed"

    inputs = {
        "hidden_states": torch.randn(1, 4, 1, 4, 4),
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 8, 16),
        "return_dict": False,
    }
    pipe.scheduler.set_timesteps(STEPS)
    with apply_plan(pipe, plan), torch.no_grad():
        transformer(**inputs)
        transformer(**inputs)
        with pytest.raises(
            AdapterError, match=r"called CosmosTransformer3DModel 3 times in step 0; .* \(cond, uncond\)"
        ):
            transformer(**inputs)


def test_loading_without_the_guardrail_package_is_one_line(folder, tmp_path):
    """A folder without a safety checker makes diffusers build `CosmosSafetyChecker`, which needs
    `cosmos_guardrail`: the loader says so in one line."""
    import shutil

    from dit_accel.harness.errors import DitAccelError

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["safety_checker"] = [None, None]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DitAccelError, match=r"^cannot load the pipeline in .*cosmos_guardrail[^\n]*$"):
        load_pipeline(str(copy))


@pytest.mark.slow
def test_cli_profile_fit_auto_and_validate(folder, tmp_path):
    """dit-profile → dit-plan fit auto → dit-plan validate from the saved folder, at guidance 5 (slow: about 10 s on
    a shared 2-core CPU; the fast tests above pin the library path)."""
    from click.testing import CliRunner

    from dit_accel.planner.cli import main as plan_main
    from dit_accel.profiler.cli import main as profile_main

    prompts, profile, plan = tmp_path / "prompts.jsonl", tmp_path / "profile.h5", tmp_path / "auto.plan"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt, "seed": p.seed}) + "\n" for p in PROMPTS))
    model = ["--model", folder, "--steps", str(STEPS), "--guidance", "5"]
    sizes = ["--height", str(COSMOS_SIZE["height"]), "--width", str(COSMOS_SIZE["width"])]
    runner = CliRunner()
    result = runner.invoke(
        profile_main, ["run", "--prompts", str(prompts), "-o", str(profile), *model, *sizes, "--quiet"]
    )
    assert result.exit_code == 0, result.output
    args = ["fit", str(profile), "--method", "auto", "--target-speedup", "1.5", "-o", str(plan), "--model", folder]
    result = runner.invoke(plan_main, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    args = ["validate", str(plan), "--prompts", str(prompts), *model, *sizes, "--repeats", "1", "--no-flops"]
    result = runner.invoke(plan_main, [*args, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["prompts"]) == len(PROMPTS)


def test_padding_mask_without_torchvision_is_one_line(tmp_path, monkeypatch):
    """Real Cosmos checkpoints set `concat_padding_mask`, whose forward resizes the mask with torchvision: without
    it, `dit-profile` exits 2 with one line naming `pip install torchvision` and writes nothing, and `apply_plan`
    refuses in one line before installing anything."""
    import sys

    from click.testing import CliRunner
    from tiny_cosmos import cosmos2_text_to_image_pipeline

    from dit_accel.profiler.cli import main as profile_main

    monkeypatch.setitem(sys.modules, "torchvision", None)  # unimportable, whether installed or not
    torch.manual_seed(0)
    pipe = cosmos2_text_to_image_pipeline(concat_padding_mask=True)
    pipe.save_pretrained(tmp_path / "model")
    prompts, profile = tmp_path / "prompts.txt", tmp_path / "profile.h5"
    prompts.write_text(PROMPTS[0].prompt + "\n")
    args = ["run", "--prompts", str(prompts), "-o", str(profile), "--model", str(tmp_path / "model"), "--steps", "2"]
    result = CliRunner().invoke(profile_main, [*args, "--quiet"])
    message = r"error: .*concat_padding_mask=True needs the package 'torchvision', .*\(pip install torchvision\)"
    assert result.exit_code == 2 and re.fullmatch(message + r"\n", result.stderr), result.output
    assert not profile.exists()

    transformer = pipe.transformer
    plan = Plan.all_compute(fingerprint_model(transformer), [1000.0, 500.0])
    with pytest.raises(AdapterError, match=r"needs the package 'torchvision'.*\(pip install torchvision\)$"):
        apply_plan(pipe, plan)
    assert not HookRegistry.check_if_exists_or_initialize(transformer).hooks, "nothing installed"
