"""The scaled hold: the planner's closed-form gains recover a known shrink, and the runtime applies exactly them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import run_steps, tiny_wan

from dit_accel.planner.reuse_costs import reuse_costs
from dit_accel.planner.search import cell_costs
from dit_accel.runtime import REUSE, Plan, PlanError, apply_plan, fingerprint_model
from dit_accel.runtime.plan import load_plan, save_plan

STEPS = [950.0, 800.0, 600.0, 400.0, 200.0]
LAGS = 5


def _profile(residuals: np.ndarray, output_norm: float = 10.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gram matrices, ‖h_out‖² and ‖R‖² as the profiler records them, from residuals [prompt, step, dim]."""
    prompts, steps, _ = residuals.shape
    gram = np.full((prompts, 1, steps, LAGS, LAGS), np.nan)
    for s in range(steps):
        lags = [i for i in range(1, LAGS + 1) if s - i >= 0]
        diffs = np.stack([residuals[:, s - i] - residuals[:, s] for i in lags], axis=1) if lags else None
        if diffs is not None:
            block = np.einsum("pid,pkd->pik", diffs, diffs)
            gram[:, 0, s, : len(lags), : len(lags)] = block
    output_sq = np.full((prompts, 1, steps), output_norm**2)
    residual_sq = np.einsum("psd,psd->ps", residuals, residuals)[:, None]
    return gram, output_sq, residual_sq


def test_gains_recover_a_known_shrink_and_make_the_scaled_hold_exact():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(3, 1, 64))
    ratio = 0.9
    residuals = direction * ratio ** np.arange(12)[None, :, None]  # R_s = 0.9^s R_0: direction fixed, norm shrinks
    gram, output_sq, residual_sq = _profile(residuals)
    costs = reuse_costs(gram, output_sq, max_run=2, residual_sq=residual_sq)
    assert costs.gain is not None and costs.gain.shape == (12, 2)
    np.testing.assert_allclose(costs.gain[2:, 0], ratio, rtol=1e-6)
    np.testing.assert_allclose(costs.gain[3:, 1], ratio**2, rtol=1e-6)
    assert np.nanmax(costs.scaled[:, 3:]) < 1e-6 < np.nanmin(costs.hold[:, 3:])
    scale_cells, hold_cells = cell_costs(costs, "scale", "max"), cell_costs(costs, "hold", "max")
    assert np.all(scale_cells[3:] <= hold_cells[3:])


def test_without_residual_norms_there_is_no_scaled_hold():
    residuals = np.random.default_rng(1).normal(size=(2, 8, 16))
    gram, output_sq, _ = _profile(residuals)
    costs = reuse_costs(gram, output_sq, max_run=2)
    assert costs.scaled is None and costs.gain is None
    with pytest.raises(Exception, match="stack_residual_sq"):
        cell_costs(costs, "scale", "max")


def _scale_plan(model, gains: np.ndarray) -> Plan:
    fingerprint = fingerprint_model(model)
    actions = np.zeros((len(fingerprint.block_ids), len(STEPS)), np.uint8)
    actions[:, [2, 3]] = REUSE
    return Plan(
        model=fingerprint,
        timesteps=np.asarray(STEPS),
        actions=actions,
        spans=((0, actions.shape[0]),),
        policy={"kind": "static", "reuse": "scale"},
        arrays={"reuse_gain": gains.astype(np.float32)},
    )


def _stack_residuals(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hooks recording, per transformer call, the first block's input and the last block's output."""
    inputs, outputs = [], []
    blocks = model.blocks
    blocks[0].register_forward_pre_hook(lambda _m, args, kwargs=None: inputs.append(args[0].clone()))
    blocks[-1].register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    return inputs, outputs


def test_the_runtime_adds_the_cached_residual_times_the_gain_of_the_step_and_run_position(tmp_path):
    model = tiny_wan().eval()
    gains = np.ones((len(STEPS), 2))
    gains[2, 0], gains[3, 1] = 0.8, 0.55
    plan = _scale_plan(model, gains)
    save_plan(plan, tmp_path / "scale.plan")
    plan = load_plan(tmp_path / "scale.plan")
    with apply_plan(model, plan):
        first_in, last_out = _stack_residuals(model)
        run_steps(model, "wan", STEPS)
    # a reused span's first block returns its input plus the residual: outputs at reuse steps are input + g · R_1
    residual = last_out[1] - first_in[1]
    assert len(last_out) == len(STEPS)
    torch.testing.assert_close(last_out[2] - first_in[2], 0.8 * residual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last_out[3] - first_in[3], 0.55 * residual, rtol=1e-5, atol=1e-6)
    with apply_plan(model, dataclasses.replace(plan, arrays={"reuse_gain": np.ones((len(STEPS), 2), np.float32)})):
        unit = run_steps(model, "wan", STEPS)
    with apply_plan(model, dataclasses.replace(plan, policy={"kind": "static"}, arrays={})):
        hold = run_steps(model, "wan", STEPS)
    assert torch.equal(unit, hold), "gains of one are a plain hold, bit for bit"


def test_a_scale_plan_without_or_with_bad_gains_is_refused_in_one_line(tmp_path):
    model = tiny_wan().eval()
    plan = _scale_plan(model, np.ones((len(STEPS), 2)))
    for arrays, message in (
        ({}, "needs array 'reuse_gain'"),
        ({"reuse_gain": np.ones((len(STEPS) + 1, 2), np.float32)}, "must be floats of shape"),
        ({"reuse_gain": np.full((len(STEPS), 2), 3.0, np.float32)}, r"gains in \[0, 2\]"),
    ):
        with pytest.raises(PlanError, match=message) as caught:
            save_plan(dataclasses.replace(plan, arrays=arrays), tmp_path / "bad.plan")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "bad.plan").exists()


def test_the_onnx_driver_scales_the_hidden_cache_by_the_manifest_gain_and_leaves_the_encoder_cache():
    from dit_accel.export.driver import OnnxPlanRunner

    residual = np.arange(6, dtype=np.float32).reshape(2, 3)
    entry = {"gain": {"0": 0.5}}
    np.testing.assert_array_equal(OnnxPlanRunner._scaled(residual, entry, "0.hidden"), residual * np.float32(0.5))
    assert OnnxPlanRunner._scaled(residual, entry, "0.encoder") is residual
    assert OnnxPlanRunner._scaled(residual, entry, "1.hidden") is residual
    assert OnnxPlanRunner._scaled(residual, {}, "0.hidden") is residual


def test_a_profile_with_fewer_steps_than_the_longest_run_fits_gains_where_it_can():
    residuals = np.random.default_rng(2).normal(size=(2, 3, 16))
    gram, output_sq, residual_sq = _profile(residuals)
    costs = reuse_costs(gram, output_sq, max_run=5, residual_sq=residual_sq)
    assert costs.gain.shape == (3, 5) and np.isfinite(costs.scaled[:, 2, :2]).all()
    assert np.isnan(costs.scaled[:, :, 2:]).all()
