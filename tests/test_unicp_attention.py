"""UniCP at cache level "attention": reuse cells priced at the self-attention's FLOPs, scored by the attention-output
drift, stored with the cost array the runtime's claims check reads, and reported as block-call speedup 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_presets import _profile_with_attention_drift
from tiny_models import make_inputs, tiny_wan

from dit_accel.planner import FitOptions, PlannerError, fit_plan
from dit_accel.planner.attention_level import self_attention_flops
from dit_accel.planner.summary import cache_memory
from dit_accel.planner.synthetic import SyntheticSpec
from dit_accel.runtime import PRUNE, REUSE, PlanError, load_plan, save_plan

ATTENTION = FitOptions(method="unicp", cache_level="attention")
BLOCK = FitOptions(method="unicp", cache_level="block")


@pytest.fixture(scope="module")
def spec() -> SyntheticSpec:
    return SyntheticSpec(steps=30, foreground_blocks=(1,))


@pytest.fixture(scope="module")
def profile(spec, tmp_path_factory) -> str:
    """A synthetic profile whose attention outputs drift twice as fast as the block residuals."""
    return _profile_with_attention_drift(tmp_path_factory.mktemp("att") / "p.h5", spec, 2 * spec.drift_table())


def test_self_attention_flops_are_what_torch_counts_for_wans_attn1():
    from dit_accel.profiler.flops import count_flops

    model = tiny_wan(1).eval()
    kwargs = make_inputs("wan")(500.0)
    frames, height, width = kwargs["hidden_states"].shape[2:]
    tokens = frames * (height // 2) * (width // 2)
    with torch.no_grad():
        _, per_module = count_flops(lambda: model(**kwargs))
    block, attention = (per_module[f"WanTransformer3DModel.blocks.0{s}"] for s in ("", ".attn1"))
    assert self_attention_flops(np.array([block]), tokens, heads=2, head_dim=8)[0] == attention < block


def test_attention_level_prices_reuse_at_the_self_attention_flops(profile):
    plan = fit_plan([profile], ATTENTION)
    block, attention = plan.arrays["cost.block_flops"], plan.arrays["cost.attention_flops"]
    other = float(plan.arrays["cost.other_flops"][0])
    reused = (plan.actions == REUSE).sum(axis=1)
    assert reused.sum() > 0 and np.all(attention < block)
    steps = plan.num_inference_steps
    pruned = (plan.actions == PRUNE).sum(axis=1)
    planned = (block.sum() + other) * steps - float(reused @ attention)
    planned -= float(pruned @ (block - plan.arrays["cost.pruned_flops"]))
    assert plan.predicted["speedup"] == pytest.approx((block.sum() + other) * steps / planned)
    assert plan.predicted["block_call_speedup"] == 1.0
    assert plan.policy == {"kind": "static", "cache_level": "attention"}
    assert "block-call speedup 1.0" in plan.provenance["chosen"]["cache_level_note"]


def test_the_same_schedule_is_faster_at_block_level(profile):
    """Equal windows (both follow the attention drift), so the block level, skipping whole blocks, predicts more."""
    attention, block = fit_plan([profile], ATTENTION), fit_plan([profile], BLOCK)
    np.testing.assert_array_equal(attention.actions, block.actions)
    assert block.predicted["speedup"] > attention.predicted["speedup"] > 1.0
    assert "cache_level" not in block.policy and block.provenance["chosen"]["cache_level"] == "block"


def test_attention_level_error_follows_the_attention_output_drift(spec, tmp_path):
    """Doubling attention_rel_l1 keeps the (scale-free) windows and doubles the attention-level predicted error; the
    block level scores its whole-block reuse by the residual drift and does not move."""
    once = _profile_with_attention_drift(tmp_path / "once.h5", spec, spec.drift_table())
    twice = _profile_with_attention_drift(tmp_path / "twice.h5", spec, 2 * spec.drift_table())
    a1, a2 = (fit_plan([p], ATTENTION) for p in (once, twice))
    b1, b2 = (fit_plan([p], BLOCK) for p in (once, twice))
    np.testing.assert_array_equal(a1.actions, a2.actions)
    assert a2.predicted["error"] == pytest.approx(2 * a1.predicted["error"], rel=1e-5)
    assert b2.predicted["error"] == pytest.approx(b1.predicted["error"], rel=1e-6)


def test_attention_level_plan_round_trips_and_its_claims_are_checked(profile, tmp_path):
    plan = fit_plan([profile], ATTENTION)
    assert load_plan(save_plan(plan, tmp_path / "a.plan")) == plan
    block_level_claim = fit_plan([profile], BLOCK).predicted["speedup"]
    edited = plan.with_changes(predicted={**plan.predicted, "speedup": block_level_claim})
    with pytest.raises(PlanError, match="claims speedup"):
        save_plan(edited, tmp_path / "b.plan")


def test_attention_level_plan_reports_one_tensor_per_reusing_block(profile):
    plan = fit_plan([profile], FitOptions(method="unicp", cache_level="attention", target_speedup=1.3))
    spans = cache_memory(plan, 32, 16, 2)["spans"]
    assert all(stop - start == 1 for start, stop in (s["span"] for s in spans))
    assert plan.provenance["chosen"]["cache_tensors_per_branch"] == sum(s["tensors"] for s in spans) > 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (FitOptions(method="auto", cache_level="attention"), "--cache-level applies to method unicp"),
        (FitOptions(method="unicp", cache_level="layer"), "--cache-level must be one of"),
        (FitOptions(method="unicp", cache_level="attention", max_cache_tensors=1), "--max-cache-tensors merges"),
    ],
)
def test_cache_level_misuse_is_refused(profile, options, message):
    with pytest.raises(PlannerError, match=message):
        fit_plan([profile], options)
