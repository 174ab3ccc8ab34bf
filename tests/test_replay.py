"""Replay: bit-identical all-compute plans, exact skipping, per-branch caches, isolation and clean removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PIPELINES, run_pipeline
from tiny_models import TINY_MODELS, make_inputs, run_steps, tiny_wan

from dit_accel.runtime import REUSE, Plan, PlanError, apply_plan, fingerprint_model, get_adapter

STEPS = [950.0, 800.0, 600.0, 400.0, 200.0, 50.0]


def reuse_plan(model, steps: int, reuse_steps=(2, 3), blocks=None, spans=()) -> Plan:
    """A plan that reuses `blocks` (default: all but the first) at `reuse_steps`."""
    fingerprint = fingerprint_model(model)
    actions = np.zeros((len(fingerprint.block_ids), steps), np.uint8)
    rows = range(1, actions.shape[0]) if blocks is None else blocks
    for b in rows:
        actions[b, list(reuse_steps)] = REUSE
    return Plan(model=fingerprint, timesteps=np.linspace(999, 1, steps), actions=actions, spans=spans)


def count_block_computations(model) -> list[int]:
    """Per block, a counter of real computations (calls of the block's first attention module)."""
    adapter = get_adapter(model)
    counts = [0] * len(adapter.block_ids(model))
    for index, (_, block, _) in enumerate(adapter.iter_blocks(model)):
        attention = getattr(block, adapter.attention[0].attr)
        attention.register_forward_pre_hook(lambda *a, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_all_compute_plan_is_bit_identical_step_by_step(name):
    model = TINY_MODELS[name]().eval()
    baseline = run_steps(model, name, STEPS)
    with apply_plan(model, Plan.all_compute(fingerprint_model(model), STEPS)):
        assert torch.equal(run_steps(model, name, STEPS), baseline)


def test_all_compute_plan_is_bit_identical_through_pipelines(tiny_pipeline):
    baseline = run_pipeline(tiny_pipeline)
    plan = Plan.all_compute(fingerprint_model(tiny_pipeline.transformer), np.linspace(999, 1, 4))
    with apply_plan(tiny_pipeline, plan):
        assert np.array_equal(run_pipeline(tiny_pipeline), baseline)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_reuse_skips_exactly_the_planned_calls(name):
    model = TINY_MODELS[name]().eval()
    baseline = run_steps(model, name, STEPS)
    counts = count_block_computations(model)
    plan = reuse_plan(model, len(STEPS))
    handle = apply_plan(model, plan)
    out = run_steps(model, name, STEPS)
    expected = (plan.actions != REUSE).sum(axis=1).tolist()
    assert counts == expected
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    handle.remove()
    assert torch.equal(run_steps(model, name, STEPS), baseline)


def test_reuse_through_pipelines_counts_and_restores(tiny_pipeline):
    transformer = tiny_pipeline.transformer
    baseline = run_pipeline(tiny_pipeline)
    counts = count_block_computations(transformer)
    plan = reuse_plan(transformer, 4, reuse_steps=(2,))
    branches = 2 if get_adapter(transformer).cfg_mode == "separate" else 1
    with apply_plan(tiny_pipeline, plan):
        video = run_pipeline(tiny_pipeline)
        assert counts == [branches * int(c) for c in (plan.actions != REUSE).sum(axis=1)]
        assert np.isfinite(video).all() and not np.array_equal(video, baseline)
        again = run_pipeline(tiny_pipeline)
    assert np.array_equal(again, video), "a second generation with the same seed must match the first"
    assert np.array_equal(run_pipeline(tiny_pipeline), baseline)


def test_span_is_cached_as_one_tensor_and_matches_per_block_caching():
    model = tiny_wan(num_layers=4).eval()
    per_block = reuse_plan(model, 3, reuse_steps=(2,), blocks=[1, 2, 3])
    spanned = reuse_plan(model, 3, reuse_steps=(2,), blocks=[1, 2, 3], spans=((1, 4),))
    with apply_plan(model, per_block):
        out_blocks = run_steps(model, "wan", STEPS[:3])
    with apply_plan(model, spanned) as handle:
        out_span = run_steps(model, "wan", STEPS[:3])
        cached = handle.cache_bytes()["cond"]
    hidden_bytes = 1 * (3 * 4 * 4) * 16 * 4  # batch × tokens × dim × float32
    assert cached == hidden_bytes, "one residual tensor for the whole span"
    # Reusing a span's summed residual equals reusing each block's residual when the inputs are unchanged.
    torch.testing.assert_close(out_span, out_blocks, rtol=1e-5, atol=1e-5)


def _interleaved(model, plan_steps, uncond: bool) -> torch.Tensor:
    """Cond and (optionally) uncond calls per step, as a separate-CFG pipeline makes them; returns the cond latent."""
    make_cond, make_uncond = make_inputs("wan", 0), make_inputs("wan", 1)
    latent = None
    with torch.no_grad():
        for i, t in enumerate(plan_steps):
            kwargs = make_cond(t)
            if latent is not None:
                kwargs["hidden_states"] = latent
            with model.cache_context("cond", step_index=i, num_inference_steps=len(plan_steps)):
                out = model(**kwargs)[0]
            if uncond:
                other = {**make_uncond(t), "hidden_states": kwargs["hidden_states"]}
                with model.cache_context("uncond", step_index=i, num_inference_steps=len(plan_steps)):
                    model(**other)
            latent = kwargs["hidden_states"] + 0.1 * out
    return latent


def test_cond_and_uncond_caches_never_mix():
    model = tiny_wan().eval()
    plan = reuse_plan(model, len(STEPS))
    with apply_plan(model, plan):
        alone = _interleaved(model, STEPS, uncond=False)
    with apply_plan(model, plan) as handle:
        mixed = _interleaved(model, STEPS, uncond=True)
        assert set(handle.cache_bytes()) == {"cond", "uncond"}
    assert torch.equal(alone, mixed)


def test_batched_cfg_rows_never_mix():
    model = TINY_MODELS["cogvideox"]().eval()
    plan = reuse_plan(model, len(STEPS))
    make = make_inputs("cogvideox")

    def run(rows: slice) -> torch.Tensor:
        latent = None
        with apply_plan(model, plan), torch.no_grad():
            for _, t in enumerate(STEPS):
                kwargs = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in make(t).items()}
                if latent is not None:
                    kwargs["hidden_states"] = latent
                with model.cache_context("cond_uncond"):
                    out = model(**kwargs)[0]
                latent = kwargs["hidden_states"] + 0.1 * out
        return latent

    both, cond_only = run(slice(0, 2)), run(slice(1, 2))
    torch.testing.assert_close(both[1:], cond_only, rtol=1e-5, atol=1e-6)


def test_two_models_with_plans_share_no_state():
    torch.manual_seed(1)
    a = tiny_wan().eval()
    torch.manual_seed(2)
    b = tiny_wan().eval()
    expected = []
    for model in (a, b):
        with apply_plan(model, reuse_plan(model, len(STEPS))):
            expected.append(run_steps(model, "wan", STEPS))
    ha, hb = apply_plan(a, reuse_plan(a, len(STEPS))), apply_plan(b, reuse_plan(b, len(STEPS)))
    make = make_inputs("wan")
    latents = [None, None]
    with torch.no_grad():
        for i, t in enumerate(STEPS):
            for k, model in enumerate((a, b)):
                kwargs = make(t)
                if latents[k] is not None:
                    kwargs["hidden_states"] = latents[k]
                with model.cache_context("cond", step_index=i, num_inference_steps=len(STEPS)):
                    out = model(**kwargs)[0]
                latents[k] = kwargs["hidden_states"] + 0.1 * out
    ha.remove(), hb.remove()
    assert torch.equal(latents[0], expected[0]) and torch.equal(latents[1], expected[1])


def test_plan_for_another_model_is_refused_before_installing():
    model = tiny_wan().eval()
    other = reuse_plan(tiny_wan(num_layers=4), len(STEPS))
    with pytest.raises(PlanError, match="4 blocks, model has 3"):
        apply_plan(model, other, force=True)
    wrong_config = reuse_plan(model, len(STEPS))
    wrong_config = wrong_config.with_changes(
        model=wrong_config.model.__class__("WanTransformer3DModel", "0" * 64, wrong_config.model.block_ids)
    )
    with pytest.raises(PlanError, match="config_hash"):
        apply_plan(model, wrong_config)
    wrong_class = wrong_config.with_changes(
        model=wrong_config.model.__class__("CogVideoXTransformer3DModel", "0" * 64, wrong_config.model.block_ids)
    )
    with pytest.raises(PlanError, match="transformer class CogVideoXTransformer3DModel"):
        apply_plan(model, wrong_class)
    assert not hasattr(model.blocks[0], "_diffusers_hook") or not model.blocks[0]._diffusers_hook.hooks
    handle = apply_plan(model, wrong_config, force=True)
    handle.remove()


def test_step_count_mismatch_and_double_apply_are_refused():
    pipe = PIPELINES["wan"]()
    plan = reuse_plan(pipe.transformer, 6)
    with apply_plan(pipe, plan):
        with pytest.raises(PlanError, match="fitted for 6 inference steps and cannot be remapped to 2"):
            run_pipeline(pipe, steps=2)
        with pytest.raises(PlanError, match="already applied"):
            apply_plan(pipe, plan)


def test_prune_steps_need_a_basis_in_the_plan():
    model = tiny_wan().eval()
    plan = reuse_plan(model, len(STEPS))
    actions = plan.actions.copy()
    actions[0, 1] = 2
    with pytest.raises(PlanError, match="has no basis 'pca.0'"):
        apply_plan(model, plan.with_changes(actions=actions))
