"""Planner fits on synthetic profiles with known answers: labels, windows, budgets, PCA, presets, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from dit_accel.planner import FitOptions, PlannerError, fit_plan, load_profiles, restore_schedule
from dit_accel.planner.adaptive_fit import simulate_adacache
from dit_accel.planner.labels import fit_labels
from dit_accel.planner.methods import FEATURE_FIELDS, METHODS, build_context
from dit_accel.planner.pca import fit_pca_bases
from dit_accel.planner.predict import Predictor, blend_weight, blended_error
from dit_accel.planner.shapes import edcw_actions, group_spans
from dit_accel.planner.synthetic import SyntheticSpec, write_synthetic_profile
from dit_accel.runtime import COMPUTE, PRUNE, REUSE, load_plan
from dit_accel.runtime.plan import save_plan

STEPS, BLOCKS = 12, 4
QUIET_BLOCK = 2


def drift_with(quiet_block: int | None = None, spike: int | None = None, base: float = 0.05) -> np.ndarray:
    """rel-L1 drift [steps, blocks]: `base` everywhere, zero for `quiet_block`, 1.0 at step `spike` for all blocks."""
    drift = np.full((STEPS, BLOCKS), base)
    if quiet_block is not None:
        drift[:, quiet_block] = 0.0
    if spike is not None:
        drift[spike] = 1.0
    return drift


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> str:
    return write_synthetic_profile(tmp_path_factory.mktemp("profiles") / "synthetic.h5")


@pytest.fixture(scope="module")
def long_profile(tmp_path_factory) -> str:
    """30 steps: room for every method to reach a 2x budget."""
    return write_synthetic_profile(tmp_path_factory.mktemp("profiles") / "long.h5", SyntheticSpec(steps=30))


def write(tmp_path, name: str = "p.h5", **spec) -> str:
    return write_synthetic_profile(tmp_path / name, SyntheticSpec(**spec))


def test_zero_drift_block_is_reused_and_drifting_blocks_are_not(tmp_path):
    path = write(tmp_path, drift=drift_with(quiet_block=QUIET_BLOCK))
    plan = fit_plan([path], FitOptions(max_error=0.0, max_reuse=STEPS, warmup=1, protect_last=1, granularity="block"))
    assert np.all(plan.actions[QUIET_BLOCK, 1:-1] == REUSE)
    assert np.all(np.delete(plan.actions, QUIET_BLOCK, axis=0) == COMPUTE)
    assert plan.predicted["error"] == 0.0 and plan.predicted["speedup"] > 1.0


def test_drift_spike_forces_a_refresh(tmp_path):
    spike = 6
    path = write(tmp_path, drift=drift_with(spike=spike, base=0.001))
    for method, budget in (("auto", {"target_speedup": 2.5}), ("unicp", {})):
        plan = fit_plan([path], FitOptions(method=method, max_reuse=STEPS, **budget))
        assert np.all(plan.actions[:, spike] != REUSE), method
        assert np.any(plan.actions[:, spike + 1] == REUSE) and np.any(plan.actions == REUSE), method


def test_edcw_windows_shrink_where_drift_is_high_and_foreground_refreshes_more(tmp_path):
    path = write(tmp_path, foreground_blocks=(0,))
    context = build_context(load_profiles([path]), FitOptions(method="unicp"))
    predictor = context.predictor
    threshold = float(np.median(predictor.drift[:, 1:] * predictor.step_weight[1:])) * 3
    actions = edcw_actions(predictor, threshold, context.protected, STEPS, prune=False)
    middle, ends = actions[:, 4:8], np.concatenate([actions[:, 1:3], actions[:, 9:11]], axis=1)
    assert (middle == REUSE).mean() > (ends == REUSE).mean()
    assert (actions[0] == REUSE).sum() < (actions[1] == REUSE).sum()


@pytest.mark.parametrize("target", [1.3, 1.7, 2.1])
@pytest.mark.parametrize("method", METHODS)
def test_budget_is_met(long_profile, method, target):
    plan = fit_plan([long_profile], FitOptions(method=method, target_speedup=target))
    assert plan.predicted["speedup"] >= target - 1e-9


def test_max_error_budget_is_respected_and_buys_speed(profile):
    loose, tight = (fit_plan([profile], FitOptions(max_error=e)) for e in (0.05, 0.005))
    assert tight.predicted["error"] <= 0.005 + 1e-12 and loose.predicted["error"] <= 0.05 + 1e-12
    assert loose.predicted["speedup"] > tight.predicted["speedup"] > 1.0


@pytest.mark.parametrize(
    "options",
    [
        FitOptions(target_speedup=50.0),
        FitOptions(method="profilingdit", target_speedup=50.0),
        FitOptions(method="bwcache", target_speedup=50.0),
        FitOptions(method="unicp", target_speedup=50.0),
    ],
)
def test_impossible_budgets_are_refused_in_one_line(profile, options):
    with pytest.raises(PlannerError, match="impossible") as info:
        fit_plan([profile], options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", METHODS)
def test_warmup_and_last_steps_are_computed(profile, method):
    plan = fit_plan([profile], FitOptions(method=method, warmup=3, protect_last=2, target_speedup=1.2))
    assert np.all(plan.actions[:, :3] == COMPUTE) and np.all(plan.actions[:, -2:] == COMPUTE)
    if plan.policy["kind"] != "static":
        assert plan.policy["protect_first"] == 3 and plan.policy["protect_last"] == 2
        expected = plan.arrays["expected_compute"]
        assert np.all(expected[:, :3] == 1.0) and np.all(expected[:, -2:] == 1.0)


@pytest.mark.parametrize("rule", ["threshold", "kmeans"])
def test_labels_follow_where_attention_falls(tmp_path, rule):
    profiles = load_profiles([write(tmp_path, foreground_blocks=(0, 2))])
    labels = fit_labels(profiles.stack("attention_received"), profiles.stack("foreground"), rule=rule)
    assert labels.labels == ("foreground", "background", "foreground", "background")
    np.testing.assert_allclose(labels.scores, [1.0, 0.0, 1.0, 0.0])
    assert 0.0 < labels.threshold < 1.0


def test_uniform_attention_scores_chance():
    """With every token tied, every token is high: R = |high ∩ fg| / |fg| = 1 = chance, which is no focus."""
    attention = np.ones((1, 1, 2, 2, 4, 4))
    mask = np.zeros((1, 2, 4, 4), np.uint8)
    mask[:, :, :2] = 1
    labels = fit_labels(attention, mask, quantile=0.8)
    np.testing.assert_allclose(labels.scores, 1.0)
    assert labels.chance == 1.0 and labels.labels == ("background", "background")


@pytest.mark.parametrize("variance, rank", [(0.95, 3), (1.0, 8)])
def test_pca_basis_is_orthonormal_and_rank_follows_variance(tmp_path, variance, rank):
    profiles = load_profiles([write(tmp_path, rank=3)])
    bases = fit_pca_bases(profiles.stack("feature_queries"), profiles.stack("feature_keys"), variance)
    for basis, explained in zip(bases.bases, bases.explained):
        assert basis.shape == (2, 8, rank)
        for head in basis:
            np.testing.assert_allclose(head.T @ head, np.eye(rank), atol=1e-6)
        assert np.all(explained >= variance - 1e-6)
    assert np.all(bases.distortion < 1e-3)


def test_lower_variance_keeps_fewer_components(tmp_path):
    profiles = load_profiles([write(tmp_path, rank=3)])
    ranks = [
        fit_pca_bases(profiles.stack("feature_queries"), profiles.stack("feature_keys"), v).ranks.max()
        for v in (0.3, 0.7, 0.95)
    ]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1] == 3


def test_unicp_plan_prunes_with_pca_bases_and_blend_weights(tmp_path):
    plan = fit_plan([write(tmp_path, head_dim=32)], FitOptions(method="unicp"))  # head dim 8: pruning saves nothing
    assert np.any(plan.actions == PRUNE)
    for block in range(BLOCKS):
        basis = plan.arrays[f"pca.{block}"]
        assert basis.dtype == np.float32 and basis.shape[:2] == (2, 32)
        assert plan.arrays[f"pca_explained.{block}"].shape == (2,)
    weights = plan.arrays["dws_weight"]
    assert weights.shape == (BLOCKS, STEPS) and weights.dtype == np.float32
    assert np.all((weights >= 0) & (weights <= 1)) and np.all(weights[plan.actions != PRUNE] == 1.0)


def test_auto_prunes_only_when_asked(tmp_path):
    profile = write(tmp_path, head_dim=32)
    assert not np.any(fit_plan([profile], FitOptions(target_speedup=1.8)).actions == PRUNE)
    pruned = fit_plan([profile], FitOptions(target_speedup=1.8, prune=True))
    assert np.any(pruned.actions == PRUNE) and "pca.0" in pruned.arrays and "dws_weight" in pruned.arrays
    slower = fit_plan([profile], FitOptions(target_speedup=1.8, prune=True, prune_time_ratio=1.2))
    assert not np.any(slower.actions == PRUNE)  # measured slower than full attention (as on CPU): never chosen
    with pytest.raises(PlannerError, match="--prune applies"):
        fit_plan([profile], FitOptions(method="bwcache", prune=True))


def test_same_inputs_give_byte_identical_plans(profile, tmp_path):
    for method in METHODS:
        first, second = tmp_path / f"{method}.a.plan", tmp_path / f"{method}.b.plan"
        save_plan(fit_plan([profile], FitOptions(method=method)), first)
        save_plan(fit_plan([profile], FitOptions(method=method)), second)
        assert first.read_bytes() == second.read_bytes(), method


def test_profiles_of_one_model_merge_and_of_different_models_are_refused(tmp_path, profile):
    other = write(tmp_path, "other.h5")
    merged = fit_plan([profile, other], FitOptions())
    assert [s["prompts"] for s in merged.provenance["profiles"]] == [2, 2]
    different = write(tmp_path, "different.h5", config_hash="f" * 64)
    with pytest.raises(PlannerError, match="different models"):
        fit_plan([profile, different], FitOptions())


@pytest.mark.parametrize(
    "method, kind",
    [
        ("profilingdit", "static"),
        ("adacache", "adacache"),
        ("bwcache", "bwcache"),
        ("unicp", "static"),
        ("auto", "static"),
    ],
)
def test_each_preset_gives_a_valid_plan_of_its_policy_kind(profile, tmp_path, method, kind):
    plan = fit_plan([profile], FitOptions(method=method))
    path = save_plan(plan, tmp_path / "m.plan")
    loaded = load_plan(path)
    assert loaded == plan and loaded.policy["kind"] == kind
    assert {"speedup", "compute_fraction", "error"} <= set(loaded.predicted)
    assert loaded.provenance["method"] == method and len(loaded.provenance["profiles"][0]["sha256"]) == 64
    assert loaded.provenance["parameters"]["method"] == method


def test_adaptive_policies_follow_the_runtime_schema(profile):
    ada = fit_plan([profile], FitOptions(method="adacache")).policy
    thresholds = [t for t, _ in ada["codebook"]]
    assert thresholds == sorted(thresholds) and thresholds[-1] >= 1.0
    assert set(ada["moreg"]) == {"enabled", "norm", "exponent", "gradient_scale", "active"} and ada["moreg"]["enabled"]
    assert 0 <= ada["probe_block"] < BLOCKS and all(isinstance(r, int) for _, r in ada["codebook"])
    bw = fit_plan([profile], FitOptions(method="bwcache")).policy
    assert set(bw) == {
        "kind",
        "threshold",
        "reuse_steps",
        "indicator_blocks",
        "protect_first",
        "protect_last",
        "half_remaining",
    }
    assert bw["threshold"] > 0 and all(0 <= b < BLOCKS for b in bw["indicator_blocks"])


def test_adacache_replay_reuses_longer_when_distance_is_low():
    policy = {
        "codebook": [[0.01, 3], [1.0, 0]],
        "moreg": {"enabled": False, "active": [0.1, 0.9]},
        "protect_first": 1,
        "protect_last": 1,
    }
    calm = simulate_adacache(policy, np.full((1, 12), 0.001), None)[0]
    busy = simulate_adacache(policy, np.full((1, 12), 0.5), None)[0]
    assert calm.tolist() == [False, False, True, True, True, False, True, True, True, False, True, False]
    assert not busy.any()


def test_methods_refuse_profiles_missing_what_they_need(tmp_path):
    needs = {
        "profilingdit": "attention_received",
        "unicp": "feature_queries",
        "adacache": "motion",
        "bwcache": "output_rel_l1",
    }
    for method, field in needs.items():
        path = write(tmp_path, f"{method}.h5", omit=(field,))
        with pytest.raises(PlannerError, match=field):
            fit_plan([path], FitOptions(method=method))
    asked = {"guidance_scale": 5.0, "record_features": True}
    with pytest.raises(PlannerError, match=r"feature_queries, feature_keys, .*linear attention.*not need them\)$"):
        fit_plan([write(tmp_path, "linear.h5", settings=asked, omit=FEATURE_FIELDS)], FitOptions(method="unicp"))
    with pytest.raises(PlannerError, match=r"re-profile recording them\)$"):
        fit_plan([write(tmp_path, "off.h5", omit=FEATURE_FIELDS)], FitOptions(method="unicp"))
    assert (
        fit_plan(
            [write(tmp_path, "bare.h5", omit=("feature_queries", "feature_keys", "attention_received"))], FitOptions()
        ).labels
        == ("unlabelled",) * BLOCKS
    )


def test_error_model_accumulates_drift_and_blends_prune_errors():
    predictor = Predictor(
        drift=np.array([[0.0, 0.1, 0.2, 0.3]]),
        prune_error=np.full((1, 4), 0.3),
        step_weight=np.ones(4),
        block_weight=np.ones(1),
        block_flops=np.array([10.0]),
        pruned_flops=np.array([6.0]),
        other_flops=0.0,
    )
    reuse = np.array([[COMPUTE, REUSE, REUSE, COMPUTE]], np.uint8)
    np.testing.assert_allclose(predictor.cell_errors(reuse), [[0.0, 0.1, 0.3, 0.0]])
    assert predictor.speedup(reuse) == 2.0
    pruned = np.array([[COMPUTE, REUSE, PRUNE, REUSE]], np.uint8)
    blended = float(blended_error(np.float64(0.3), np.float64(0.3)))
    np.testing.assert_allclose(predictor.cell_errors(pruned), [[0.0, 0.1, blended, blended + 0.3]])
    np.testing.assert_allclose(predictor.dws_weights(pruned)[0, 2], blend_weight(np.float64(0.3), np.float64(0.3)))
    assert blended == pytest.approx(0.3 / np.sqrt(2))


def test_restore_schedule_recomputes_the_costliest_cells_first(profile):
    plan = fit_plan([profile], FitOptions(target_speedup=1.8))
    context = build_context(load_profiles([profile]), FitOptions())
    before = context.predictor.error(plan.actions)
    restored = restore_schedule(context.predictor, plan.actions, before / 4, min_cells=1)
    assert (
        context.predictor.error(restored) <= before / 4
        and (restored == COMPUTE).sum() > (plan.actions == COMPUTE).sum()
    )


def test_spans_group_contiguous_blocks_with_identical_rows():
    actions = np.zeros((5, 4), np.uint8)
    actions[1:4, 2] = REUSE
    actions[4, 1] = REUSE
    assert group_spans(actions) == ((1, 4),)
    assert group_spans(actions, alone=np.array([False, False, True, False, False])) == ()


def test_auto_units_share_one_schedule_as_spans(profile):
    stack = fit_plan([profile], FitOptions(target_speedup=1.5))
    assert stack.spans == ((0, BLOCKS),) and stack.predicted["speedup"] >= 1.5
    by_label = fit_plan([profile], FitOptions(target_speedup=1.5, granularity="label"))
    assert by_label.labels[0] == "foreground" and (1, BLOCKS) in by_label.spans
    per_block = fit_plan([profile], FitOptions(target_speedup=1.5, granularity="block"))
    assert per_block.predicted["error"] <= stack.predicted["error"] + 1e-12


def test_plan_files_are_byte_reproducible(profile, tmp_path):
    from dit_accel.runtime.plan import plan_to_bytes

    plan = fit_plan([profile], FitOptions(method="bwcache"))
    assert len({plan_to_bytes(plan) for _ in range(16)}) == 1
    assert save_plan(plan, tmp_path / "a.plan").read_bytes() == plan_to_bytes(plan)


def test_sensitivity_weights_reproduce_measured_single_step_errors():
    from dit_accel.planner.drift import sensitivity_weights

    steps, blocks = 10, 3
    rng = np.random.default_rng(0)
    weights = np.full(steps, 0.1)
    drift = rng.uniform(0.01, 0.05, size=(blocks, steps))
    measured = np.full((2, steps), np.nan)
    measured[0, [1, 5, 8]] = [0.4, 0.02, 0.01]
    measured[1, [1, 5, 8]] = [0.2, 0.04, 0.01]
    scaled = sensitivity_weights(weights, drift, measured)
    predicted_single = scaled * drift.sum(axis=0)
    np.testing.assert_allclose(predicted_single[[1, 5, 8]], [0.3, 0.03, 0.01])
    factor = scaled / weights
    assert factor[0] == pytest.approx(factor[1]) and factor[9] == pytest.approx(factor[8])  # held beyond the ends
    between = np.log(factor[1:6])
    np.testing.assert_allclose(np.diff(between), np.diff(between)[0])  # log-linear between measured steps
    assert np.array_equal(sensitivity_weights(weights, drift, np.full((1, steps), np.nan)), weights)


def test_auto_without_measured_reuse_costs_extrapolates_by_default_and_presets_hold(profile):
    plan = fit_plan([profile], FitOptions(method="auto", target_speedup=1.3))
    assert plan.policy == {"kind": "static", "reuse": "extrapolate"}
    assert plan.predicted["error_model"] != "measured-reuse-v2"  # the synthetic profile has no reuse_gram
    assert fit_plan([profile], FitOptions(method="auto", target_speedup=1.3, reuse="hold")).policy["reuse"] == "hold"
    assert "reuse" not in fit_plan([profile], FitOptions(method="profilingdit")).policy
    with pytest.raises(PlannerError, match="'extrapolate' / 'slope' are for --method auto only"):
        fit_plan([profile], FitOptions(method="profilingdit", reuse="extrapolate"))
    with pytest.raises(PlannerError, match="--reuse slope needs --method auto, a profile with measured reuse costs"):
        fit_plan([profile], FitOptions(method="auto", target_speedup=1.3, reuse="slope"))
    for method in ("auto", "profilingdit"):  # a corrector front is never ignored silently
        with pytest.raises(PlannerError, match="--front-blocks needs --method auto, a profile with measured reuse"):
            fit_plan([profile], FitOptions(method=method, target_speedup=1.3, front_blocks=1))
