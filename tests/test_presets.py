"""The four paper presets pin their papers' behaviour on synthetic profiles (docs/methods.md has the paper rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_accel.planner import FitOptions, PlannerError, fit_plan
from dit_accel.planner.adaptive_fit import simulate_adacache, simulate_bwcache
from dit_accel.planner.labels import fit_labels
from dit_accel.planner.synthetic import SyntheticSpec, write_synthetic_profile
from dit_accel.runtime import COMPUTE, REUSE
from dit_accel.runtime.adaptive import AdaCachePolicy

UNICP = FitOptions(method="unicp")


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> str:
    """30 steps, 4 blocks, block 1 foreground-focused."""
    spec = SyntheticSpec(steps=30, foreground_blocks=(1,))
    return write_synthetic_profile(tmp_path_factory.mktemp("presets") / "p.h5", spec)


def test_profilingdit_score_is_the_share_of_the_foreground_covered():
    """High attention covering the whole (small) foreground and as much background scores R = 1, not 1/2."""
    attention = np.zeros((1, 1, 2, 1, 4, 4))
    mask = np.zeros((1, 1, 4, 4), np.uint8)
    mask[0, 0, 0, :2] = 1
    attention[0, 0, 0, 0, 0, :4] = 1.0  # block 0: the 2 foreground tokens and 2 background ones
    attention[0, 0, 1, 0, 3, :4] = 1.0  # block 1: 4 background tokens
    labels = fit_labels(attention, mask, quantile=0.75)
    np.testing.assert_allclose(labels.scores, [1.0, 0.0])
    assert labels.chance == pytest.approx(0.25)
    assert labels.labels == ("foreground", "background")


def test_profilingdit_never_caches_a_foreground_block(profile):
    plan = fit_plan([profile], FitOptions(method="profilingdit"))
    assert plan.labels == ("background", "foreground", "background", "background")
    assert np.all(plan.actions[1] == COMPUTE)
    assert all(np.any(plan.actions[b] == REUSE) for b in (0, 2, 3))
    assert plan.provenance["chosen"]["foreground_blocks"] == [1]


def test_profilingdit_default_refresh_is_the_papers_fixed_interval(profile):
    """Released Wan defaults: refresh every 6 of 50 steps after the warm-up (every 4 of 30 here)."""
    plan = fit_plan([profile], FitOptions(method="profilingdit", protect_last=0))
    warmup = plan.provenance["parameters"]["warmup"]
    computed = np.flatnonzero(plan.actions[0] == COMPUTE)
    refreshes = computed[computed >= warmup]
    assert set(np.diff(refreshes)) == {round(6 * 30 / 50)}


def test_profilingdit_decreasing_refresh_shrinks(profile):
    plan = fit_plan([profile], FitOptions(method="profilingdit", protect_last=0, refresh="decreasing"))
    warmup = plan.provenance["parameters"]["warmup"]
    computed = np.flatnonzero(plan.actions[0] == COMPUTE)
    gaps = np.diff(computed[computed >= warmup])
    assert gaps[0] > gaps[-1] and np.all(np.diff(gaps) <= 0)


def test_profilingdit_says_when_no_block_is_foreground(tmp_path):
    path = write_synthetic_profile(tmp_path / "bg.h5", SyntheticSpec(steps=30, foreground_blocks=()))
    plan = fit_plan([path], FitOptions(method="profilingdit"))
    assert "no block is foreground-focused" in plan.provenance["chosen"]["labels_note"]


def test_profilingdit_rejects_an_unknown_refresh(profile):
    with pytest.raises(PlannerError, match="--refresh"):
        fit_plan([profile], FitOptions(method="profilingdit", refresh="sometimes"))


def _runs_after_triggers(reuse: np.ndarray) -> list[tuple[int, int]]:
    """(trigger step, length of the reuse run that follows it) for every run in a reuse row."""
    runs, step = [], 0
    while step < len(reuse):
        if reuse[step]:
            start = step
            while step < len(reuse) and reuse[step]:
                step += 1
            runs.append((start - 1, step - start))
        step += 1
    return runs


@pytest.mark.parametrize("steps", [10, 20, 31])
def test_bwcache_reuses_only_the_first_half_of_the_steps_after_a_trigger(steps):
    policy = {
        "threshold": 1.0,
        "reuse_steps": steps,  # longer than any half: only the end rule limits the runs
        "indicator_blocks": [0],
        "protect_first": 1,
        "protect_last": 0,
        "half_remaining": True,
    }
    reuse = simulate_bwcache(policy, np.full((1, steps), 0.01))[0]
    runs = _runs_after_triggers(reuse)
    assert runs and not reuse[-1]
    for trigger, length in runs:
        assert length == (steps - 1 - trigger) // 2


def test_bwcache_fit_uses_the_end_rule_and_no_invented_refresh(profile):
    plan = fit_plan([profile], FitOptions(method="bwcache"))
    assert plan.policy["half_remaining"] is True and "refresh_every" not in plan.policy
    assert plan.policy["protect_last"] == 0 and plan.policy["reuse_steps"] == 3


def test_adacache_probes_mid_depth_by_default(profile):
    """AdaCache's code probes block 13 of 28: round(13/28 · 4) = 2 here; --probe correlated keeps the old choice."""
    assert fit_plan([profile], FitOptions(method="adacache")).policy["probe_block"] == 2
    correlated = fit_plan([profile], FitOptions(method="adacache", probe="correlated")).policy["probe_block"]
    assert correlated == 0  # equal drift in every block: the first of the tied correlations
    with pytest.raises(PlannerError, match="--probe"):
        fit_plan([profile], FitOptions(method="adacache", probe="deepest"))


def test_adacache_distance_is_normalised_by_the_cached_residual():
    """‖p_s − p_c‖₁ / ‖p_c‖₁ = 1 / 2 misses a 0.4 threshold; normalised by ‖p_s‖₁ (1 / 3) it would reuse."""
    policy = {
        "kind": "adacache",
        "probe_block": 0,
        "codebook": [[0.4, 3], [1e9, 0]],
        "moreg": {"enabled": False},
        "protect_first": 1,
        "protect_last": 0,
    }
    runtime = AdaCachePolicy(policy, num_blocks=1)
    cached = torch.tensor([[[2.0], [0.0]]])
    for step, residual in enumerate((cached, cached + torch.tensor([[[0.0], [1.0]]]))):
        assert not runtime.begin_step("cond", step, 10)
        runtime.observe("cond", 0, torch.zeros_like(residual), residual, step, tokens_per_frame=2)
        runtime.end_step("cond", step, 10)
    assert not runtime.begin_step("cond", 2, 10)


@pytest.mark.parametrize("method", ["profilingdit", "adacache", "bwcache", "unicp"])
@pytest.mark.parametrize("target", [1.5, 2.0])
def test_each_preset_lands_near_its_target_or_says_what_it_reaches(profile, method, target):
    plan = fit_plan([profile], FitOptions(method=method, target_speedup=target))
    reached = plan.predicted["speedup"]
    assert reached >= target - 1e-9
    note = plan.provenance["chosen"].get("target_note")
    assert (reached <= 1.1 * target) == (note is None)
    if note is not None:
        assert f"{reached:.2f}x above" in note


def test_recorder_records_the_self_attention_output_drift():
    """attention_rel_l1 at (step, block) is ‖a_s − a_{s−1}‖₁ / ‖a_{s−1}‖₁ of the block's attn1 output."""
    from tiny_models import run_steps, tiny_wan

    from dit_accel.profiler.recorder import Recorder, RecordSettings
    from dit_accel.runtime import get_adapter

    torch.manual_seed(0)
    model = tiny_wan(2).eval()
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for index, block in enumerate(model.blocks):
        block.attn1.register_forward_hook(lambda m, a, out, i=index: seen[i].append(out.detach().clone()))
    settings = RecordSettings(num_inference_steps=3, record_attention=False, record_features=False, reuse_lags=0)
    recorder = Recorder(model, get_adapter(model), settings)
    recorder.begin_prompt(0)
    run_steps(model, "wan", [999.0, 600.0, 200.0])
    recorded = recorder.collect(("cond",))["attention_rel_l1"][0]
    recorder.remove()
    assert np.isnan(recorded[0]).all()
    for block, outputs in seen.items():
        expected = [float((b - a).abs().sum() / a.abs().sum()) for a, b in zip(outputs, outputs[1:])]
        np.testing.assert_allclose(recorded[1:, block], expected, rtol=1e-5)


def _profile_with_attention_drift(path, spec: SyntheticSpec, attention: np.ndarray) -> str:
    """A synthetic profile whose prompts also hold attention_rel_l1 = `attention` [steps, blocks] (NaN at step 0)."""
    from dit_accel.planner.synthetic import synthetic_arrays, synthetic_header
    from dit_accel.profiler.schema import ProfileWriter, PromptInfo, prompt_key

    rng = np.random.default_rng(0)
    drift = np.broadcast_to(attention, (2, *attention.shape)).copy()
    drift[:, 0] = np.nan
    prompts = [
        (PromptInfo(prompt_key(i), i, f"p{i}", "", i), {**synthetic_arrays(spec, rng), "attention_rel_l1": drift})
        for i in range(spec.prompts)
    ]
    ProfileWriter(path, synthetic_header(spec)).add_prompts(prompts)
    return str(path)


def test_unicp_windows_follow_the_attention_output_drift(tmp_path):
    """A spike in one block's attention drift closes that block's window; blocks whose attention drifts like their
    residual keep the windows they get from the residual drift."""
    spec = SyntheticSpec(steps=30, foreground_blocks=(1,))
    attention = spec.drift_table().copy()
    attention[15, 2] = 5.0
    with_attention = fit_plan([_profile_with_attention_drift(tmp_path / "a.h5", spec, attention)], UNICP)
    without = fit_plan([write_synthetic_profile(tmp_path / "old.h5", spec)], UNICP)
    assert with_attention.provenance["chosen"]["window_signal"] == "attention_rel_l1"
    assert "window_signal_note" not in with_attention.provenance["chosen"]
    assert without.actions[2, 15] == REUSE and with_attention.actions[2, 15] != REUSE
    np.testing.assert_array_equal(with_attention.actions[[0, 1, 3]], without.actions[[0, 1, 3]])


def test_unicp_on_an_old_profile_falls_back_to_block_drift_and_says_so(profile):
    chosen = fit_plan([profile], UNICP).provenance["chosen"]
    assert chosen["window_signal"] == "residual_rel_l1"
    assert "attention_rel_l1 is not in the profile" in chosen["window_signal_note"]


def test_adaptive_prediction_reports_the_per_prompt_speedup_range(profile):
    plan = fit_plan([profile], FitOptions(method="adacache", target_speedup=1.5))
    low, high = plan.predicted["step_speedup_range"]
    steps = plan.actions.shape[1]
    mean_computed = plan.arrays["expected_compute"][0].sum()
    assert 1.0 <= low <= steps / mean_computed <= high


@pytest.mark.slow
def test_adacache_predicted_block_call_speedup_is_what_the_runtime_computes(tmp_path):
    """On the default model at 8 steps: the speedup the fit simulates on its calibration prompts is the block-call
    speedup the runtime reaches on them (within 10 %)."""
    from dit_accel.bench.presets import counted_block_calls
    from dit_accel.harness.captions import CALIBRATION
    from dit_accel.harness.pipelines import generate, load_pipeline
    from dit_accel.harness.prompts import PromptSpec
    from dit_accel.profiler.recorder import RecordSettings
    from dit_accel.profiler.run import profile_prompts
    from dit_accel.runtime import apply_plan

    pipe, steps = load_pipeline(None), 8
    specs = [PromptSpec(text, "", 1000 + i) for i, text in enumerate(CALIBRATION[:2])]
    settings = RecordSettings(
        num_inference_steps=steps, record_attention=False, record_features=False, sensitivity_steps=0
    )
    profile_prompts(pipe, specs, tmp_path / "p.h5", settings, progress=False)
    plan = fit_plan([str(tmp_path / "p.h5")], FitOptions(method="adacache", target_speedup=1.25))
    predicted = steps / plan.arrays["expected_compute"][0].sum()
    assert predicted > 1.0
    with counted_block_calls(pipe.transformer) as counts, apply_plan(pipe, plan):
        for spec in specs:
            generate(pipe, spec, steps, 5.0, {})
    measured = 2 * len(specs) * steps * len(counts) / counts.sum()
    assert measured == pytest.approx(predicted, rel=0.1)


def test_unicp_reports_the_cache_tensors_inspect_predicts(profile):
    from dit_accel.planner.summary import cache_memory

    plan = fit_plan([profile], FitOptions(method="unicp", target_speedup=2.0))
    spans = cache_memory(plan, 32, 16, 2)["spans"]
    assert plan.provenance["chosen"]["cache_tensors_per_branch"] == sum(s["tensors"] for s in spans) > 0


def test_unicp_cache_bound_merges_windows_and_still_meets_the_target(profile):
    from dit_accel.planner.summary import cache_memory

    free = fit_plan([profile], FitOptions(method="unicp", target_speedup=1.5))
    bounded = fit_plan([profile], FitOptions(method="unicp", target_speedup=1.5, max_cache_tensors=1))
    assert free.provenance["chosen"]["cache_tensors_per_branch"] > 1
    assert bounded.provenance["chosen"]["cache_tensors_per_branch"] == 1
    assert sum(s["tensors"] for s in cache_memory(bounded, 32, 16, 2)["spans"]) == 1
    reusing = np.flatnonzero(np.any(bounded.actions == REUSE, axis=1))
    assert reusing.size >= 2 and (np.diff(reusing) == 1).all()  # one contiguous span shares one window row
    assert (bounded.actions[reusing] == bounded.actions[reusing[0]]).all()
    assert bounded.predicted["speedup"] >= 1.5 - 1e-9


def test_the_cache_bound_is_refused_for_other_methods(profile):
    with pytest.raises(PlannerError, match="--max-cache-tensors applies to method unicp"):
        fit_plan([profile], FitOptions(method="auto", target_speedup=1.5, max_cache_tensors=2))


def test_adacache_gap_replay_on_the_calibration_profile_is_the_prediction(profile):
    """bench.adacache_gap replays a plan on any profile; on the one it was fitted on, it gives the plan's prediction."""
    from dit_accel.bench.adacache_gap import replayed_speedup
    from dit_accel.planner.profiles import load_profiles

    plan = fit_plan([profile], FitOptions(method="adacache", target_speedup=1.5))
    pooled, per_prompt = replayed_speedup(plan.policy, load_profiles([profile]))
    assert pooled == pytest.approx(plan.actions.shape[1] / plan.arrays["expected_compute"][0].sum())
    assert min(per_prompt) == pytest.approx(plan.predicted["step_speedup_range"][0])


def test_moreg_makes_a_prompt_with_more_motion_than_the_calibration_reuse_less(profile):
    """(m / norm)^8: 10 % more motion than calibrated multiplies the distances by 2.1, so fewer steps reuse; this is
    why AdaCache's speed on prompts unlike the calibration ones cannot be predicted from the calibration profile."""
    from dit_accel.bench.adacache_gap import deciding_branch
    from dit_accel.planner.profiles import load_profiles

    plan = fit_plan([profile], FitOptions(method="adacache", target_speedup=1.5))
    profiles, probe = load_profiles([profile]), plan.policy["probe_block"]
    drift = deciding_branch(profiles, "residual_rel_l1", probe)
    drift[:, 0] = 0.0
    motion = deciding_branch(profiles, "motion", probe)
    calibrated = simulate_adacache(plan.policy, drift, motion).sum()
    assert 0 < simulate_adacache(plan.policy, drift, 1.1 * motion).sum() < calibrated
