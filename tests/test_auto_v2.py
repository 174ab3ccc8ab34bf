"""`auto` v2 end to end on the default model: measured reuse costs → exact search → closed loop (planner/methods.py)."""

from __future__ import annotations

import re
import shutil

import h5py
import numpy as np
import pytest
import torch

from dit_accel.harness.captions import CALIBRATION
from dit_accel.harness.pipelines import generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.planner import FitOptions, PlannerError
from dit_accel.planner.closed_loop import FAIL_RATIO, closed_loop_from_profile
from dit_accel.planner.methods import fit_profiles
from dit_accel.planner.profiles import load_profiles
from dit_accel.planner.shapes import corrector_fronts
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts
from dit_accel.profiler.schema import seal
from dit_accel.runtime import REUSE, apply_plan

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    pipe = load_pipeline(None)
    path = tmp_path_factory.mktemp("auto_v2") / "calibration.h5"
    specs = [PromptSpec(text, "", 1000 + i) for i, text in enumerate(CALIBRATION[:2])]
    settings = RecordSettings(
        num_inference_steps=STEPS, record_attention=False, record_features=False, sensitivity_steps=3
    )
    profile_prompts(pipe, specs, path, settings, progress=False)
    profiles = load_profiles([path])
    # the closed loop replays one of the two prompts: half the suite time, the same code paths
    loop = closed_loop_from_profile(pipe, profiles.profiles[0].prompts, profiles.header.settings, limit=1)
    return path, profiles, loop


def test_a_few_step_plan_is_refused_or_passes_its_closed_loop_and_records_what_it_measured(calibrated):
    _, profiles, loop = calibrated
    for target in (1.3, 1.6):
        try:
            plan = fit_profiles(profiles, FitOptions(target_speedup=target, refine_rounds=1), loop)
        except PlannerError as exc:
            reachable = r"(the next slower schedule that passes is \d+\.\d\dx|no slower schedule passes either)"
            assert re.search(rf"fails its closed loop: .* {reachable} at {STEPS} steps", str(exc)), exc
            continue
        record = plan.predicted["closed_loop"]
        assert record["prompts"] == 1 and len(record["candidates"]) >= 2
        assert record["refinement"]["rounds"] <= 1 and record["generations"] > len(record["candidates"])
        assert {c["front_blocks"] for c in record["candidates"]} <= set(corrector_fronts(plan.num_blocks))
        assert plan.provenance["chosen"]["front_blocks"] in corrector_fronts(plan.num_blocks)
        assert record["measured_worst"] <= plan.predicted["error"] * FAIL_RATIO
        assert plan.predicted["speedup"] >= target - 1e-9
        assert float(loop.measure(plan).max()) == pytest.approx(record["measured_worst"], rel=1e-3)


def test_without_a_closed_loop_the_search_meets_the_budget_and_may_reuse_the_last_step(calibrated):
    _, profiles, _ = calibrated
    plan = fit_profiles(profiles, FitOptions(target_speedup=2.0), None)
    reuse = plan.actions[0] == REUSE
    assert plan.policy["reuse"] in ("hold", "slope") and not reuse[0]
    assert np.all(plan.actions == plan.actions[0])  # one whole-stack schedule
    assert plan.predicted["speedup"] >= 2.0 and plan.predicted["error_model"] == "measured-reuse-v2"
    if plan.policy["reuse"] == "slope":
        beta = plan.policy["slope_scale"]
        assert all(0.0 <= b <= j + 1 for j, b in enumerate(beta))


def test_forced_steps_compute_and_hold_only_is_respected(calibrated):
    _, profiles, _ = calibrated
    plan = fit_profiles(profiles, FitOptions(target_speedup=1.5, warmup=2, protect_last=1, reuse="hold"), None)
    reuse = plan.actions[0] == REUSE
    assert not reuse[:2].any() and not reuse[-1] and plan.policy == {"kind": "static", "reuse": "hold"}


def _block_calls(pipe, plan=None) -> np.ndarray:
    """Computations of every block over one generation, counted by the test's own hooks on each block's first
    linear layer (a reused block's own forward hooks still fire: the plan replaces what its forward does)."""
    firsts = [next(m for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in pipe.transformer.blocks]
    counts = np.zeros(len(firsts), dtype=int)
    handles = [
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1)) for i, m in enumerate(firsts)
    ]
    spec = PromptSpec(CALIBRATION[0], "", 7)
    try:
        if plan is None:
            generate(pipe, spec, STEPS, 5.0, {}, output_type="latent")
        else:
            with apply_plan(pipe, plan):
                generate(pipe, spec, STEPS, 5.0, {}, output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    return counts


def test_a_corrector_plan_computes_its_front_blocks_and_skips_exactly_the_planned_calls(calibrated):
    _, profiles, loop = calibrated
    plan = fit_profiles(profiles, FitOptions(target_speedup=1.5, front_blocks=2), None)
    blocks = plan.num_blocks
    reuse = plan.actions == REUSE
    assert not reuse[:2].any() and reuse[2:].any() and np.all(reuse[2:] == reuse[2])
    assert plan.spans == ((2, blocks),) and plan.provenance["chosen"]["front_blocks"] == 2
    assert plan.predicted["speedup"] >= 1.5
    vanilla, accelerated = _block_calls(loop.pipe), _block_calls(loop.pipe, plan)
    calls_per_step = vanilla // STEPS
    assert np.all(vanilla == calls_per_step * STEPS)
    assert np.array_equal(accelerated, calls_per_step * (~reuse).sum(axis=1))


def test_a_front_that_leaves_nothing_to_reuse_is_refused_in_one_line(calibrated):
    _, profiles, _ = calibrated
    blocks = profiles.num_blocks
    with pytest.raises(PlannerError, match=rf"--front-blocks {blocks - 1} leaves no span to reuse: use 0 to"):
        fit_profiles(profiles, FitOptions(target_speedup=1.5, front_blocks=blocks - 1), None)


def test_the_scaled_hold_on_a_profile_written_before_it_existed_is_refused_in_one_line(calibrated, tmp_path):
    path, _, _ = calibrated
    old = tmp_path / "old.h5"
    shutil.copyfile(path, old)
    with h5py.File(old, "a") as f:
        for prompt in f["prompts"].values():
            del prompt["reuse/stack_residual_sq"]
    seal(old)  # as the profiler of that time sealed it
    with pytest.raises(PlannerError, match=r"^--reuse scale needs profile field stack_residual_sq.*re-profile$"):
        fit_profiles(load_profiles([old]), FitOptions(target_speedup=1.5, reuse="scale"), None)
    plan = fit_profiles(load_profiles([old]), FitOptions(target_speedup=1.5), None)
    assert plan.policy["reuse"] in ("hold", "slope") and "reuse_gain" not in plan.arrays
