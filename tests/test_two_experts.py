"""Wan 2.2 two-expert pipelines (`transformer` serves the high-noise steps, `transformer_2` the rest, switching at
`boundary_ratio`): profiled, planned and replayed as one schedule over the global steps.

Block calls are counted by plain torch pre-hooks on each expert's attention modules (a reused block never reaches
them), independent of the runtime's own hooks. Tiny configs; the text-to-video flow runs once per module.
"""

from __future__ import annotations

import copy
import types
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_experts import BOUNDARY_RATIO, SIZE, save_expert_pipeline, wan22_i2v_pipeline, wan22_t2v_pipeline
from tiny_models import tiny_wan

from dit_accel.harness.pipelines import generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner.cli import main as plan_cli
from dit_accel.planner.errors import PlannerError
from dit_accel.planner.methods import FitOptions, fit_plan
from dit_accel.planner.validate import PipelineRunner, validate_plan
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts, with_expert_starts
from dit_accel.profiler.schema import open_profile
from dit_accel.runtime import COMPUTE, REUSE, Plan, apply_plan, fingerprint_model, get_adapter, save_plan
from dit_accel.runtime.adapters import WeightsMismatchWarning, find_experts, fingerprint_pipeline
from dit_accel.runtime.errors import AdapterError, PlanError

STEPS = 6
GUIDANCE = 5.0
PROMPT = PromptSpec("a large red circle moves right on a blue background", "", 0)
EXPERTS = ("transformer", "transformer_2")


def first_low_noise_step(pipe, steps: int) -> int:
    """The first step `transformer_2` serves, as the pipeline decides it (timestep below boundary_ratio · T)."""
    pipe.scheduler.set_timesteps(steps)
    boundary = BOUNDARY_RATIO * pipe.scheduler.config.num_train_timesteps
    return int(np.argmax(pipe.scheduler.timesteps.numpy() < boundary))


def run(pipe, spec: PromptSpec = PROMPT, steps: int = STEPS) -> torch.Tensor:
    with torch.no_grad():
        return generate(pipe, spec, steps, GUIDANCE, SIZE, output_type="latent")


def count_block_calls(pipe, fn) -> dict[str, list[int]]:
    """Per expert, how often each block's self-attention ran during `fn()`."""
    counts: dict[str, list[int]] = {}
    handles = []
    for name, module in find_experts(pipe):
        blocks = get_adapter(module).iter_blocks(module)
        counts[name] = [0] * len(blocks)
        for index, (_, block, _) in enumerate(blocks):

            def bump(*_, row=counts[name], index=index):
                row[index] += 1

            handles.append(block.attn1.register_forward_pre_hook(bump))
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return counts


def expected_calls(actions: np.ndarray, first: int, branches: int = 2) -> dict[str, list[int]]:
    """Per expert, the block calls a schedule computes over the steps that expert serves (from step `first` on:
    `transformer_2`), with both CFG branches."""
    served = {"transformer": slice(0, first), "transformer_2": slice(first, None)}
    return {name: [branches * int((row[s] != REUSE).sum()) for row in actions] for name, s in served.items()}


def counted_speedup(header, counts: dict[str, list[int]], calls: int) -> float:
    """FLOP speedup of a run with `calls` transformer calls and the counted block calls, from the FLOPs per call
    and per block that the profiler measured with torch's counter."""
    planned = calls * (header.model_flops - header.block_flops.sum()) + sum(
        float(np.dot(header.block_flops, row)) for row in counts.values()
    )
    return calls * header.model_flops / planned


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    """A saved and reloaded tiny Wan 2.2 T2V pipeline, its profile and the `auto` plan fitted on it."""
    root = tmp_path_factory.mktemp("wan22")
    folder = save_expert_pipeline(wan22_t2v_pipeline, root / "t2v")
    pipe = load_pipeline(str(folder))
    settings = RecordSettings(num_inference_steps=STEPS, guidance_scale=GUIDANCE, sensitivity_steps=0)
    profile_prompts(pipe, [PROMPT], root / "profile.h5", settings, size=SIZE, progress=False)
    plan = fit_plan([str(root / "profile.h5")], FitOptions(method="auto", target_speedup=1.6))
    save_plan(plan, root / "wan22.plan")
    return types.SimpleNamespace(root=root, folder=str(folder), pipe=pipe, plan=plan, profile=root / "profile.h5")


def test_profile_records_both_experts_at_global_steps(t2v):
    header = open_profile(t2v.profile).header
    first = first_low_noise_step(t2v.pipe, STEPS)
    assert 1 < first < STEPS - 1
    assert header.fingerprint.expert_names == EXPERTS
    assert header.fingerprint.experts[0].first_step == first
    assert header.fingerprint == fingerprint_pipeline(t2v.pipe)
    drift = open_profile(t2v.profile).stack("residual_rel_l1")
    assert drift.shape[2] == STEPS and np.isfinite(drift[:, :, 1:]).all(), "every step after the first has drift"


def test_fitted_plan_reuses_on_both_experts_but_never_at_an_expert_start(t2v):
    plan, first = t2v.plan, first_low_noise_step(t2v.pipe, STEPS)
    assert plan.model.expert_names == EXPERTS and plan.model.experts[0].first_step == first
    assert not (plan.actions[:, first] == REUSE).any()
    assert (plan.actions[:, :first] == REUSE).any() and (plan.actions[:, first:] == REUSE).any()


@pytest.mark.slow
def test_validate_measures_the_predicted_flop_speedup(t2v):
    plan, runner = t2v.plan, PipelineRunner(t2v.pipe, GUIDANCE, SIZE)
    report = validate_plan(plan, runner, [PROMPT], steps=STEPS, repeats=1, warmup=False, progress=False)
    assert report.flop_speedup == pytest.approx(plan.predicted["speedup"], rel=0.02)


def test_all_compute_is_exact_and_caching_skips_the_planned_calls_on_both_experts(t2v):
    pipe, plan = t2v.pipe, t2v.plan
    vanilla = run(pipe)
    with apply_plan(pipe, Plan.all_compute(plan.model, plan.timesteps)):
        assert torch.equal(run(pipe), vanilla)
    with apply_plan(pipe, plan):
        counts = count_block_calls(pipe, lambda: run(pipe))
    assert counts == expected_calls(plan.actions, first_low_noise_step(pipe, STEPS))
    for name, module in find_experts(pipe):
        assert not module._diffusers_hook.hooks, f"remove() left hooks on {name}"
    speedup = counted_speedup(open_profile(t2v.profile).header, counts, 2 * STEPS)
    assert speedup == pytest.approx(plan.predicted["speedup"], rel=0.02)


def test_wrong_plans_are_refused_in_one_line_naming_the_expert(t2v):
    pipe, plan = t2v.pipe, t2v.plan
    single = Plan.all_compute(fingerprint_model(pipe.transformer), plan.timesteps)
    alone = types.SimpleNamespace(transformer=pipe.transformer)
    adaptive = Plan.all_compute(
        plan.model,
        plan.timesteps,
        policy={"kind": "bwcache", "threshold": 0.1, "reuse_steps": 1, "refresh_every": 2, "indicator_blocks": [0]}
        | {"protect_first": 1, "protect_last": 1},
    )
    swapped = types.SimpleNamespace(transformer=pipe.transformer_2, transformer_2=pipe.transformer)
    refusals = [
        (lambda: apply_plan(pipe, single), "transformer_2 would run unaccelerated"),
        (lambda: apply_plan(pipe.transformer, plan), "apply it to the pipeline it was fitted on"),
        (lambda: apply_plan(alone, plan), "the pipeline has transformer:"),
        (lambda: apply_plan(swapped, plan), "the pipeline's transformer holds the weights the plan recorded for"),
        (lambda: apply_plan(pipe, adaptive), "decides reuse online without knowing where the experts switch"),
    ]
    for attempt, words in refusals:
        with pytest.raises(PlanError) as caught:
            attempt()
        assert words in str(caught.value) and "\n" not in str(caught.value)
    tuned = copy.deepcopy(pipe.transformer_2)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.mul_(1.5)
    other = types.SimpleNamespace(transformer=pipe.transformer, transformer_2=tuned)
    with pytest.warns(WeightsMismatchWarning, match="^transformer_2: "):
        apply_plan(other, plan).remove()
    with pytest.raises(PlanError, match="^transformer_2: .* sampled weights differ"):
        apply_plan(other, plan, strict_weights=True)
    assert not any(m._diffusers_hook.hooks for m in (pipe.transformer, pipe.transformer_2, tuned))


def test_experts_with_other_blocks_and_reuse_at_an_expert_start_are_refused(t2v):
    with pytest.raises(AdapterError, match="experts transformer and transformer_2 have different blocks"):
        find_experts(types.SimpleNamespace(transformer=tiny_wan(3), transformer_2=tiny_wan(2)))
    plan, first = t2v.plan, t2v.plan.model.experts[0].first_step
    actions = np.array(plan.actions)
    actions[:, first] = REUSE
    with pytest.raises(PlanError, match=f"reused at step {first}, the first step of expert transformer_2"):
        plan.with_changes(actions=actions, predicted={})


def test_cli_failures_are_one_line_exit_2_and_leave_no_file(t2v):
    single = t2v.root / "single.plan"
    save_plan(Plan.all_compute(fingerprint_model(t2v.pipe.transformer), t2v.plan.timesteps), single)
    (t2v.root / "prompts.txt").write_text("a red circle\n")
    cases = [
        (["fit", t2v.profile, "--method", "adacache", "-o", t2v.root / "ada.plan"], "switches experts", "ada.plan"),
        (["export-onnx", t2v.root / "wan22.plan", "-o", t2v.root / "onnx"], "not supported", "onnx"),
        (
            ["validate", single, "--model", t2v.folder, "--prompts", t2v.root / "prompts.txt", "--repeats", "1"],
            "transformer_2 would run unaccelerated",
            "no.file",
        ),
    ]  # fmt: skip
    for args, words, output in cases:
        result = CliRunner().invoke(plan_cli, [str(a) for a in args])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # diffusers' bars aside
        assert result.exit_code == 2 and len(errors) == 1 and words in errors[0], result.stderr
        assert result.stderr.strip().endswith(errors[0]) and "Traceback" not in result.output
        assert not (t2v.root / output).exists()
    with pytest.raises(PlannerError, match="method bwcache places reuse by rules"):
        fit_plan([str(t2v.profile)], FitOptions(method="bwcache"))


def test_i2v_second_expert_follows_the_global_steps(tmp_path):
    """Wan 2.2 I2V passes no step index: the experts share one call counter, so `transformer_2` replays the plan's
    steps from the boundary on (not from 0), and a plan that reuses at its first step (as a remapped run length
    may) computes there instead of reading an empty cache."""
    torch.manual_seed(0)
    pipe = wan22_i2v_pipeline()
    pipe.set_progress_bar_config(disable=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    spec = PromptSpec("a red circle", "", 3, image=str(tmp_path / "a.png"))
    steps = 5
    first = first_low_noise_step(pipe, steps)
    fingerprint = with_expert_starts(fingerprint_pipeline(pipe), {s: int(s >= first) for s in range(steps)})
    actions = np.full((3, steps), COMPUTE, np.uint8)
    actions[:, [1, first + 1]] = REUSE
    plan = Plan(model=fingerprint, timesteps=np.linspace(999.0, 1.0, steps), actions=actions)
    with apply_plan(pipe, plan):
        counts = count_block_calls(pipe, lambda: run(pipe, spec, steps))
    assert counts == expected_calls(actions, first)

    unsafe = actions.copy()
    unsafe[:, first] = REUSE  # without recorded expert starts the plan is accepted; the runtime computes there
    blind = Plan(model=fingerprint_pipeline(pipe), timesteps=plan.timesteps, actions=unsafe)
    with warnings.catch_warnings(), apply_plan(pipe, blind):
        warnings.simplefilter("error")
        counts = count_block_calls(pipe, lambda: run(pipe, spec, steps))
    assert counts == expected_calls(actions, first), "the reuse at transformer_2's first step was computed"


@pytest.mark.slow
def test_i2v_saved_pipeline_profile_fit_apply(tmp_path):
    """The whole flow on a saved Wan 2.2 I2V pipeline: both experts profiled, the plan replayed exactly as planned."""
    pipe = load_pipeline(str(save_expert_pipeline(wan22_i2v_pipeline, tmp_path / "i2v")))
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    spec = PromptSpec("a red circle", "", 3, image=str(tmp_path / "a.png"))
    settings = RecordSettings(num_inference_steps=STEPS, guidance_scale=GUIDANCE, sensitivity_steps=0)
    profile_prompts(pipe, [spec], tmp_path / "p.h5", settings, size=SIZE, progress=False)
    header = open_profile(tmp_path / "p.h5").header
    assert np.isfinite(open_profile(tmp_path / "p.h5").stack("residual_rel_l1")[:, :, 1:]).all()
    plan = fit_plan([str(tmp_path / "p.h5")], FitOptions(method="auto", target_speedup=1.6))
    first = first_low_noise_step(pipe, STEPS)
    assert plan.model.experts[0].first_step == first and (plan.actions[:, first:] == REUSE).any()
    vanilla = run(pipe, spec)
    with apply_plan(pipe, Plan.all_compute(plan.model, plan.timesteps)):
        assert torch.equal(run(pipe, spec), vanilla)
    with apply_plan(pipe, plan):
        counts = count_block_calls(pipe, lambda: run(pipe, spec))
    assert counts == expected_calls(plan.actions, first)
    assert counted_speedup(header, counts, 2 * STEPS) == pytest.approx(plan.predicted["speedup"], rel=0.02)
