"""Every supported family end to end, with classifier-free guidance and without: profile through `profile_prompts`
(what `dit-profile` runs), fit `auto`, apply.

Per row: the profile holds exactly the CFG branches the pipeline ran; an all-compute plan reproduces the vanilla video
bit for bit; the fitted caching plan skips exactly the block calls it plans to skip, counted by plain torch forward
hooks on each block's attention module (a reused block never reaches it) — independent of the runtime's own hooks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import PIPELINE_EXTRA, PIPELINE_SIZES, TINY_MODELS, TINY_PIPELINES, count_computed, save_tiny_pipeline

from dit_accel.harness.pipelines import generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner.methods import FitOptions, fit_plan
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts
from dit_accel.profiler.schema import open_profile
from dit_accel.runtime import REUSE, Plan, PlanError, apply_plan, fingerprint_model, get_adapter

STEPS = 6
PROMPTS = [
    PromptSpec("a large red circle moves right on a blue background", "", 0),
    PromptSpec("a small white square moves up on a black background", "", 1),
]
#: Families whose pipeline makes one transformer call per step at any guidance (guidance-distilled: the scale is an
#: input of the model, not a second branch; Flux embeds it the same way).
DISTILLED = {"hunyuan_video", "flux"}
#: Rows of the fast suite: one family with separate CFG calls at guidance 5, one with batched CFG at guidance 1; the
#: other rows (each 10-70 s on a shared 2-core CPU) are marked slow. Every family also has fast step-by-step tests
#: of its transformer (tests/test_adapters.py, tests/test_replay.py).
FAST = {("wan", 5.0), ("cogvideox", 1.0)}
#: Families checked at guidance 5 only, to keep the suite within its time budget: Flux has no CFG branch at any
#: guidance, and Wan VACE and SanaVideo share their CFG handling with Wan and the batched families checked at both.
ONE_GUIDANCE = {"wan_vace", "flux", "sana_video"}
ROWS = [
    pytest.param(
        name, guidance, marks=[] if (name, guidance) in FAST else [pytest.mark.slow], id=f"{name}-cfg{guidance:g}"
    )
    for name in sorted(TINY_PIPELINES)
    for guidance in ((5.0,) if name in ONE_GUIDANCE else (5.0, 1.0))
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved tiny pipeline folder per family, built on first use."""
    cache: dict[str, str] = {}

    def folder(name: str) -> str:
        if name not in cache:
            cache[name] = str(save_tiny_pipeline(name, tmp_path_factory.mktemp(name)))
        return cache[name]

    return folder


def _prompts(name: str) -> list[PromptSpec]:
    return [dataclasses.replace(spec, extra=PIPELINE_EXTRA.get(name, {})) for spec in PROMPTS]


def _run(pipe, name: str, guidance: float) -> np.ndarray:
    with torch.no_grad():
        return generate(pipe, _prompts(name)[0], STEPS, guidance, PIPELINE_SIZES[name], output_type="latent").numpy()


@pytest.mark.parametrize(("name", "guidance"), ROWS)
def test_profile_fit_apply(name, guidance, folders, tmp_path):
    pipe = load_pipeline(folders(name))
    settings = RecordSettings(num_inference_steps=STEPS, guidance_scale=guidance, sensitivity_steps=0)
    path = tmp_path / "profile.h5"
    profile_prompts(pipe, _prompts(name), path, settings, size=PIPELINE_SIZES[name], progress=False)
    profile = open_profile(path)
    expected = ("cond", "uncond") if guidance > 1.0 and name not in DISTILLED else ("cond",)
    assert profile.header.branches == expected
    drift = profile.stack("residual_rel_l1")
    assert drift.shape[:2] == (len(PROMPTS), len(expected)) and np.isfinite(drift[:, :, 1:]).all()

    plan = fit_plan([str(path)], FitOptions(method="auto", target_speedup=1.5, warmup=1, protect_last=1))
    assert (plan.actions == REUSE).any(), "a 1.5x plan reuses some block calls"
    other = TINY_MODELS["mochi" if name == "wan" else "wan"]()
    with pytest.raises(PlanError, match="plan is for transformer class"):
        apply_plan(pipe, Plan.all_compute(fingerprint_model(other), plan.timesteps))
    vanilla = _run(pipe, name, guidance)
    with apply_plan(pipe, Plan.all_compute(plan.model, plan.timesteps)):
        assert np.array_equal(_run(pipe, name, guidance), vanilla)

    counts, calls, handles = count_computed(pipe.transformer)
    try:
        with apply_plan(pipe, plan):
            cached = _run(pipe, name, guidance)
    finally:
        for handle in handles:
            handle.remove()
    separate = get_adapter(pipe.transformer).cfg_mode == "separate"
    calls_per_step = len(expected) if separate else 1  # batched CFG runs both branches in one call
    assert calls[0] == calls_per_step * STEPS
    assert counts == [calls_per_step * int((row != REUSE).sum()) for row in plan.actions]
    assert np.isfinite(cached).all() and not np.array_equal(cached, vanilla)


@pytest.mark.slow
def test_image_to_video_prompts_carry_their_image(tmp_path):
    """A `.jsonl` line's `image` reaches an I2V pipeline (it changes the video); a line without one is refused before
    anything is generated or written."""
    from PIL import Image
    from tiny_models import tiny_wan_i2v_pipeline

    from dit_accel.harness.errors import DitAccelError
    from dit_accel.harness.prompts import read_prompt_file

    torch.manual_seed(0)
    pipe = tiny_wan_i2v_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    lines = [f'{{"prompt": "a red circle", "image": "{n}", "seed": 4}}' for n in ("a.png", "b.png")]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    specs = read_prompt_file(tmp_path / "p.jsonl")
    size = PIPELINE_SIZES["wan"]
    with torch.no_grad():
        videos = [generate(pipe, spec, 2, 5.0, size, output_type="latent") for spec in specs]
    assert not torch.equal(*videos)

    settings = RecordSettings(num_inference_steps=2, sensitivity_steps=0)
    profile_prompts(pipe, specs[:1], tmp_path / "ok.h5", settings, size=size, progress=False)
    assert open_profile(tmp_path / "ok.h5").header.branches == ("cond", "uncond")
    with pytest.raises(DitAccelError, match="needs 'image' and prompt 2 has none"):
        profile_prompts(pipe, [specs[0], PromptSpec("no image")], tmp_path / "bad.h5", settings, size=size)
    assert not (tmp_path / "bad.h5").exists()


def test_jsonl_conditioning_fields_and_their_refusals(tmp_path):
    from dit_accel.harness.errors import DitAccelError
    from dit_accel.harness.prompts import read_prompt_file

    (tmp_path / "img.png").write_bytes(b"not read until generation")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "negative_prompt": "b", "seed": 7, "image": "img.png", "extra": {"eta": 0.5}}\n')
    assert read_prompt_file(path) == [PromptSpec("a", "b", 7, str(tmp_path / "img.png"), {"eta": 0.5})]
    bad = {
        '{"prompt": "a", "negative": "b"}': "unknown key 'negative'",
        '{"prompt": "a", "image": "missing.png"}': "missing.png does not exist",
        '{"prompt": "a", "extra": [1]}': "'extra' must be an object",
        '{"prompt": "a", "extra": {"guidance_scale": 2}}': "'extra' may not set 'guidance_scale'",
        '{"prompt": "a", "seed": true}': "'seed' must be an integer",
    }
    for line, message in bad.items():
        path.write_text(line + "\n")
        with pytest.raises(DitAccelError, match=message):
            read_prompt_file(path)


def test_missing_packages_are_named_in_one_line(tmp_path, monkeypatch):
    """Without accelerate, diffusers refuses Wan folders with a message about low_cpu_mem_usage; the loader names the
    package instead. A pipeline whose prompt cleaner needs a missing package (SkyReels-V2: ftfy) is refused at load."""
    import importlib.util
    import sys
    import types

    from dit_accel.harness import pipelines
    from dit_accel.harness.errors import DitAccelError

    def no_accelerate(*_args, **_kwargs):
        raise ValueError("`low_cpu_mem_usage` cannot be False when `keep_in_fp32_modules` is True.")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(pipelines, "_load", no_accelerate)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "accelerate" else real_find_spec(n, *a))
    with pytest.raises(DitAccelError, match=r"needs the package 'accelerate'.*\(pip install accelerate\)$"):
        pipelines.load_pipeline(str(tmp_path))

    module = types.ModuleType("fake_skyreels")
    exec("def basic_clean(text):\n    return ftfy.fix_text(text)\nclass Pipe:\n    pass\n", module.__dict__)
    monkeypatch.setitem(sys.modules, "fake_skyreels", module)
    module.Pipe.__module__ = "fake_skyreels"
    with pytest.raises(DitAccelError, match=r"Pipe cleans prompts with the package 'ftfy'.*\(pip install ftfy\)"):
        pipelines._check_prompt_cleaning(module.Pipe())


#: The full CLI rows (closed-loop `auto` and every preset): one family with separate CFG calls at guidance 5, one with
#: batched CFG at guidance 1. Every other family runs a shorter CLI row in tests/test_models_cli.py.
CLI_ROWS = [("wan", 5.0), ("cogvideox", 1.0)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "guidance"), CLI_ROWS, ids=[f"{n}-cfg{g:g}" for n, g in CLI_ROWS])
def test_cli_profile_fit_every_method_and_validate(name, guidance, folders, tmp_path):
    """dit-profile → dit-plan fit (auto and each preset) → dit-plan validate from a saved folder: each fit either works
    or is refused in one line with exit code 2 and no file; every plan written validates."""
    import json

    from click.testing import CliRunner

    from dit_accel.planner.cli import main as plan_main
    from dit_accel.profiler.cli import main as profile_main

    folder, prompts, profile = folders(name), tmp_path / "prompts.jsonl", tmp_path / "profile.h5"
    prompts.write_text("".join(json.dumps({"prompt": p.prompt, "seed": p.seed}) + "\n" for p in PROMPTS))
    size = PIPELINE_SIZES[name]
    model = ["--model", folder, "--steps", str(STEPS), "--guidance", str(guidance)]
    sizes = ["--frames", str(size["num_frames"]), "--height", str(size["height"]), "--width", str(size["width"])]
    runner = CliRunner()
    result = runner.invoke(
        profile_main, ["run", "--prompts", str(prompts), "-o", str(profile), *model, *sizes, "--quiet"]
    )
    assert result.exit_code == 0, result.output
    written = []
    for method in ("auto", "profilingdit", "adacache", "bwcache", "unicp"):
        plan = tmp_path / f"{method}.plan"
        args = ["fit", str(profile), "--method", method, "--target-speedup", "1.5", "-o", str(plan), "--quiet"]
        result = runner.invoke(plan_main, [*args, "--model", folder] if method == "auto" else args)
        if result.exit_code == 0:
            written.append(plan)
            continue
        assert result.exit_code == 2 and not plan.exists(), (method, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert tmp_path / "auto.plan" in written
    for plan in written:
        args = ["validate", str(plan), "--prompts", str(prompts), *model, *sizes, "--repeats", "1", "--no-flops"]
        result = runner.invoke(plan_main, [*args, "--json", "--quiet"])
        assert result.exit_code == 0, (plan.name, result.output)
        assert len(json.loads(result.stdout)["prompts"]) == len(PROMPTS)
