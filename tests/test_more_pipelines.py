"""Complete tiny pipelines of the families first tested on their transformer alone (`tests/tiny_more_pipelines.py`):
saved with `save_pretrained`, loaded back with `load_pipeline`, profiled through `profile_prompts` (what `dit-profile`
runs), fitted with `auto` and applied.

Per pipeline: the profile holds exactly the CFG branches the pipeline ran; an all-compute plan reproduces the vanilla
latent bit for bit; the fitted caching plan skips exactly the planned block calls, counted by plain torch pre-hooks
on each block's attention module (a reused block never reaches it); a plan for another model is refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import count_computed, tiny_wan
from tiny_more_pipelines import qwen_image_pipeline

from dit_accel.harness.pipelines import generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner.methods import FitOptions, fit_plan
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts
from dit_accel.profiler.schema import open_profile
from dit_accel.runtime import REUSE, Plan, PlanError, apply_plan, fingerprint_model, get_adapter, load_plan

STEPS = 6
PROMPTS = [
    PromptSpec("a large red circle moves right on a blue background", "", 0),
    PromptSpec("a small white square moves up on a black background", "", 1),
]
QWEN_SIZE = {"height": 32, "width": 32}
#: Qwen-Image runs CFG as a second, named call only with `true_cfg_scale` > 1 and a negative prompt.
QWEN_CFG = {"negative_prompt": "blurry", "extra": {"true_cfg_scale": 4.0}}


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_image")
    torch.manual_seed(0)
    qwen_image_pipeline().save_pretrained(folder)
    return str(folder)


def _check_profile_fit_apply(
    pipe,
    prompts: list[PromptSpec],
    size: dict,
    branches: tuple[str, ...],
    tmp_path,
    guidance: float = 1.0,
    calls_per_step: int | None = None,
) -> None:
    """Profile, fit `auto`, and check branches, bit-identical all-compute replay, exact skips and refusal.

    `calls_per_step` is how many transformer calls the pipeline makes per step (default: one per branch)."""
    calls_per_step = len(branches) if calls_per_step is None else calls_per_step
    settings = RecordSettings(num_inference_steps=STEPS, guidance_scale=guidance, sensitivity_steps=0)
    path = tmp_path / "profile.h5"
    profile_prompts(pipe, prompts, path, settings, size=size, progress=False)
    profile = open_profile(path)
    assert profile.header.branches == branches
    drift = profile.stack("residual_rel_l1")
    assert drift.shape[:2] == (len(prompts), len(branches)) and np.isfinite(drift[:, :, 1:]).all()

    plan = fit_plan([str(path)], FitOptions(method="auto", target_speedup=1.5, warmup=1, protect_last=1))
    assert (plan.actions == REUSE).any(), "a 1.5x plan reuses some block calls"
    with pytest.raises(PlanError, match="plan is for transformer class"):
        apply_plan(pipe, Plan.all_compute(fingerprint_model(tiny_wan()), plan.timesteps))

    def run() -> np.ndarray:
        with torch.no_grad():
            return generate(pipe, prompts[0], STEPS, guidance, size, output_type="latent").numpy()

    vanilla = run()
    with apply_plan(pipe, Plan.all_compute(plan.model, plan.timesteps)):
        assert np.array_equal(run(), vanilla)
    counts, calls, handles = count_computed(pipe.transformer)
    try:
        with apply_plan(pipe, plan):
            cached = run()
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == calls_per_step * STEPS
    assert counts == [calls_per_step * int((row != REUSE).sum()) for row in plan.actions]
    assert np.isfinite(cached).all() and not np.array_equal(cached, vanilla)


@pytest.mark.parametrize("cfg", [True, False], ids=["true_cfg4", "no_cfg"])
def test_qwen_image_pipeline(cfg, qwen_folder, tmp_path):
    pipe = load_pipeline(qwen_folder)
    prompts = [dataclasses.replace(p, **QWEN_CFG) for p in PROMPTS] if cfg else PROMPTS
    branches = ("cond", "uncond") if cfg else ("cond",)
    _check_profile_fit_apply(pipe, prompts, QWEN_SIZE, branches, tmp_path)


HY15_STEPS = 4
HY15_SIZE = {"num_frames": 5, "height": 16, "width": 16}


@pytest.mark.slow
def test_hunyuan_video15_pipeline(tmp_path):
    """HunyuanVideo 1.5 (slow: its pipeline encodes 1108 text tokens and attends over 1000 of them, about 10 s).

    Its guider names the calls `pred_cond` / `pred_uncond`, which the profiler reads as the two CFG branches. The
    pipeline takes its guidance from the guider, not a `guidance_scale` keyword: the harness's `generate` (which
    `dit-profile` and `validate` use) sets the guider for the call and puts the user's guider back. An all-compute plan
    reproduces the vanilla latent bit for bit, and a hand-made caching plan skips exactly the planned block calls in
    both branches."""
    from tiny_more_pipelines import hunyuan_video15_pipeline

    from dit_accel.profiler.recorder import Recorder

    torch.manual_seed(0)
    hunyuan_video15_pipeline().save_pretrained(tmp_path / "hy15")
    pipe = load_pipeline(str(tmp_path / "hy15"))
    transformer = pipe.transformer

    guider = pipe.guider

    def run() -> np.ndarray:
        with torch.no_grad():
            latent = generate(pipe, PROMPTS[0], HY15_STEPS, 5.0, HY15_SIZE, output_type="latent").numpy()
        assert pipe.guider is guider
        return latent

    recorder = Recorder(transformer, get_adapter(transformer), RecordSettings(num_inference_steps=HY15_STEPS))
    try:
        recorder.begin_prompt(0)
        vanilla_recorded = run()
        assert recorder.observed_branches() == ("cond", "uncond")
    finally:
        recorder.remove()
    vanilla = run()
    assert np.array_equal(vanilla, vanilla_recorded), "the probes change nothing"
    timesteps = np.asarray(pipe.scheduler.timesteps)
    blocks = len(get_adapter(transformer).block_ids(transformer))
    with apply_plan(pipe, Plan.all_compute(fingerprint_model(transformer), timesteps)):
        assert np.array_equal(run(), vanilla)
    actions = np.zeros((blocks, HY15_STEPS), np.uint8)
    actions[1:, 2] = REUSE
    plan = Plan(model=fingerprint_model(transformer), timesteps=timesteps, actions=actions)
    counts, calls, handles = count_computed(transformer)
    try:
        with apply_plan(pipe, plan):
            cached = run()
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == 2 * HY15_STEPS
    assert counts == [2 * int((row != REUSE).sum()) for row in actions]
    assert np.isfinite(cached).all() and not np.array_equal(cached, vanilla)


LTX2_SIZE = {"num_frames": 5, "height": 32, "width": 32}  # the pipeline wants sizes divisible by 32
#: LTX-2 prompts: a short text window (the pipeline pads to `max_sequence_length`, 1024 by default), and
#: spatio-temporal and modality-isolation guidance off, so each step is the one batched CFG call.
LTX2_EXTRA = {
    "max_sequence_length": 16,
    "stg_scale": 0.0,
    "audio_stg_scale": 0.0,
    "modality_scale": 1.0,
    "audio_modality_scale": 1.0,
}
#: The audio stream's guidance defaults to 7 whatever `guidance_scale` is: CFG-free needs it set to 1 as well.
LTX2_NO_CFG = {"audio_guidance_scale": 1.0}


@pytest.fixture(scope="module")
def ltx2_folder(tmp_path_factory):
    from tiny_more_pipelines import ltx2_pipeline

    folder = tmp_path_factory.mktemp("ltx2")
    torch.manual_seed(0)
    ltx2_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("guidance", [4.0, 1.0], ids=["cfg4", "cfg1"])
def test_ltx2_pipeline(guidance, ltx2_folder, tmp_path):
    """LTX-2 (video and audio in one transformer; CFG batched in one call per step): at guidance 4 the profile holds
    both branches of the batched call, at guidance 1 (audio guidance 1 too) the cond branch alone."""
    pipe = load_pipeline(ltx2_folder)
    cfg = guidance > 1.0
    extra = LTX2_EXTRA if cfg else {**LTX2_EXTRA, **LTX2_NO_CFG}
    prompts = [dataclasses.replace(p, extra=extra) for p in PROMPTS]
    branches = ("cond", "uncond") if cfg else ("cond",)
    _check_profile_fit_apply(pipe, prompts, LTX2_SIZE, branches, tmp_path, guidance, calls_per_step=1)


def test_ltx2_extra_guidance_passes(ltx2_folder, tmp_path):
    """At LTX-2's default guidance the pipeline adds a spatio-temporal and a modality-isolation guidance call to the
    batched CFG call of each step. The profile records the two CFG branches only, and attention only in the CFG call
    (the extra passes perturb attention); the plan's schedule runs in all three calls."""
    from dit_accel.profiler.recorder import Recorder

    pipe = load_pipeline(ltx2_folder)
    extra = {"max_sequence_length": 16, "spatio_temporal_guidance_blocks": [1]}
    prompts = [dataclasses.replace(p, extra=extra) for p in PROMPTS]
    settings = RecordSettings(num_inference_steps=STEPS, guidance_scale=4.0)
    recorder = Recorder(pipe.transformer, get_adapter(pipe.transformer), settings)
    active, calls = [], [0]
    attention = pipe.transformer.transformer_blocks[0].attn1
    handles = [
        attention.register_forward_pre_hook(lambda *_: active.append(recorder.attention_active)),
        pipe.transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)),
    ]
    try:
        recorder.begin_prompt(0)
        with torch.no_grad():
            generate(pipe, prompts[0], STEPS, 4.0, LTX2_SIZE, output_type="latent")
        assert recorder.observed_branches() == ("cond", "uncond")
    finally:
        recorder.remove()
        for handle in handles:
            handle.remove()
    assert calls[0] == 3 * STEPS
    assert sum(active) == len(settings.attention_steps())
    _check_profile_fit_apply(pipe, prompts, LTX2_SIZE, ("cond", "uncond"), tmp_path, 4.0, calls_per_step=3)


@pytest.mark.slow
def test_hunyuan_video15_cli_profile_fit_and_validate(tmp_path):
    """dit-profile → dit-plan fit auto → dit-plan validate from a saved HunyuanVideo 1.5 folder at guidance 5, one
    prompt (slow: about 20 s on a shared 2-core CPU, its 1108 text tokens dominate). The fit skips the closed loop
    (a closed loop on this model takes minutes; it replays through the same `generate` as validate). The target is
    1.2×: the blocks are about two thirds of this tiny model's step, the text refiner and embedders the rest."""
    import json

    from click.testing import CliRunner
    from tiny_more_pipelines import hunyuan_video15_pipeline

    from dit_accel.planner.cli import main as plan_main
    from dit_accel.profiler.cli import main as profile_main

    folder, prompts, profile, plan = tmp_path / "hy15", tmp_path / "p.jsonl", tmp_path / "p.h5", tmp_path / "a.plan"
    torch.manual_seed(0)
    hunyuan_video15_pipeline().save_pretrained(folder)
    prompts.write_text(json.dumps({"prompt": PROMPTS[0].prompt, "seed": PROMPTS[0].seed}) + "\n")
    model = ["--model", str(folder), "--steps", str(HY15_STEPS), "--guidance", "5"]
    sizes = [f"--{key.removeprefix('num_')}={value}" for key, value in HY15_SIZE.items()]
    runner = CliRunner()
    args = ["run", "--prompts", str(prompts), "-o", str(profile), *model, *sizes, "--sensitivity-steps", "0"]
    result = runner.invoke(profile_main, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert open_profile(profile).header.branches == ("cond", "uncond")
    args = ["fit", str(profile), "--method", "auto", "--target-speedup", "1.2", "-o", str(plan), "--no-closed-loop"]
    result = runner.invoke(plan_main, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert (load_plan(plan).actions == REUSE).any()
    args = ["validate", str(plan), "--prompts", str(prompts), *model, *sizes, "--repeats", "1", "--no-flops"]
    result = runner.invoke(plan_main, [*args, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["prompts"]) == 1
