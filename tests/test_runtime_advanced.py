"""Runtime beyond static caching: step remapping, PCA-pruned attention, DWS blending, adaptive policies."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PIPELINES, run_pipeline
from test_replay import count_block_computations
from tiny_models import TINY_MODELS, make_inputs, run_steps, tiny_wan

from dit_accel.profiler.flops import count_flops
from dit_accel.runtime import COMPUTE, PRUNE, REUSE, Plan, PlanError, apply_plan, fingerprint_model, get_adapter
from dit_accel.runtime.pruning import ProjectedAttention, kernel_rank
from dit_accel.runtime.replay_table import remap_actions

STEPS = [950.0, 800.0, 600.0, 400.0, 200.0, 50.0]


def static_plan(model, actions: np.ndarray, **kwargs) -> Plan:
    return Plan(
        model=fingerprint_model(model), timesteps=np.linspace(999, 1, actions.shape[1]), actions=actions, **kwargs
    )


def random_bases(model, rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Orthonormal (heads, head_dim, rank) bases for every block."""
    heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
    rng = np.random.default_rng(seed)
    bases = {}
    for block in range(len(get_adapter(model).block_ids(model))):
        q, _ = np.linalg.qr(rng.normal(size=(heads, dim, dim)))
        bases[f"pca.{block}"] = q[:, :, :rank].astype(np.float32)
    return bases


# --- step remapping -----------------------------------------------------------------------------------------------


def test_remapped_plans_keep_warmup_and_final_steps():
    actions = np.zeros((3, 10), np.uint8)
    actions[1:, 2:8] = REUSE
    for steps in (5, 7, 14, 20):
        remapped = remap_actions(actions, steps)
        assert remapped.shape == (3, steps)
        assert (remapped[:, 0] == COMPUTE).all() and (remapped[:, -1] == COMPUTE).all()
        assert (remapped[:, : max(1, round(2 * steps / 10))] == COMPUTE).all(), "warm-up keeps its share"
        assert (remapped == REUSE).any()
    for steps in (4, 21):
        with pytest.raises(PlanError, match="cannot be remapped"):
            remap_actions(actions, steps)


def test_pipeline_with_other_step_count_replays_the_remapped_plan():
    pipe = PIPELINES["wan"]()
    actions = np.zeros((3, 6), np.uint8)
    actions[1:, 2:4] = REUSE
    plan = static_plan(pipe.transformer, actions)
    counts = count_block_computations(pipe.transformer)
    with apply_plan(pipe, plan):
        video = run_pipeline(pipe, steps=9)
    expected = (remap_actions(actions, 9) != REUSE).sum(axis=1) * 2  # cond and uncond
    assert counts == expected.tolist() and np.isfinite(video).all()


def test_counter_mode_reads_the_run_length_from_the_scheduler():
    pipe = PIPELINES["cogvideox"]()  # batched CFG, no step_index in its cache context
    actions = np.zeros((3, 6), np.uint8)
    actions[1:, 2:4] = REUSE
    counts = count_block_computations(pipe.transformer)
    with apply_plan(pipe, static_plan(pipe.transformer, actions)):
        run_pipeline(pipe, steps=8)
    assert counts == (remap_actions(actions, 8) != REUSE).sum(axis=1).tolist()


# --- pruned attention ---------------------------------------------------------------------------------------------


def test_projected_attention_matches_float64_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    basis = torch.linalg.qr(torch.randn(3, 16, 16))[0][:, :, :6]
    with ProjectedAttention(basis):
        out = F.scaled_dot_product_attention(q, k, v)
    qd, kd, vd, bd = q.double(), k.double(), v.double(), basis.double()
    scores = torch.einsum("bhsd,hdr->bhsr", qd, bd) @ torch.einsum("bhsd,hdr->bhsr", kd, bd).transpose(-1, -2)
    reference = torch.softmax(scores / math.sqrt(16), dim=-1) @ vd
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuan_video"])
def test_full_rank_basis_reproduces_full_attention_and_low_rank_changes_it(name):
    model = TINY_MODELS[name]().eval()
    baseline = run_steps(model, name, STEPS)
    blocks = len(get_adapter(model).block_ids(model))
    actions = np.zeros((blocks, len(STEPS)), np.uint8)
    actions[:, 2:5] = PRUNE
    dim = model.config.attention_head_dim
    counts = count_block_computations(model)
    with apply_plan(model, static_plan(model, actions, arrays=random_bases(model, dim))):
        full_rank = run_steps(model, name, STEPS)
    assert counts == [len(STEPS)] * blocks, "prune steps still compute the block"
    torch.testing.assert_close(full_rank, baseline, rtol=1e-4, atol=1e-5)
    with apply_plan(model, static_plan(model, actions, arrays=random_bases(model, dim // 4))):
        low_rank = run_steps(model, name, STEPS)
    assert torch.isfinite(low_rank).all() and not torch.allclose(low_rank, baseline, atol=1e-5)


def test_pruning_saves_attention_flops():
    model = tiny_wan().eval()
    make = make_inputs("wan")
    actions = np.full((3, 1), PRUNE, np.uint8)
    dim = model.config.attention_head_dim
    rank = dim // 4

    def one_call() -> None:
        with torch.no_grad(), model.cache_context("cond", step_index=0, num_inference_steps=1):
            model(**make(500.0))

    full, _ = count_flops(one_call)
    with apply_plan(model, static_plan(model, actions, arrays=random_bases(model, rank))):
        pruned, _ = count_flops(one_call)
    heads, tokens = model.config.num_attention_heads, 3 * 4 * 4
    rank = kernel_rank(rank, dim)  # the runtime pads bases to the fused kernels' multiple of 8
    saved_scores = 2 * heads * tokens * tokens * (dim - rank)
    projection_cost = 2 * 2 * heads * tokens * dim * rank
    assert full - pruned == 3 * (saved_scores - projection_cost)


def test_dws_weight_zero_is_reuse_and_one_is_pure_pruning():
    model = tiny_wan().eval()
    bases = random_bases(model, 2)
    reuse = np.zeros((3, len(STEPS)), np.uint8)
    reuse[:, 3] = REUSE
    prune = np.zeros_like(reuse)
    prune[:, 3] = PRUNE
    results = {}
    for label, actions, weight in [
        ("reuse", reuse, None),
        ("w0", prune, 0.0),
        ("w1", prune, 1.0),
        ("pruned", prune, None),
    ]:
        arrays = dict(bases)
        if weight is not None:
            arrays["dws_weight"] = np.full(actions.shape, weight, np.float32)
        with apply_plan(model, static_plan(model, actions, arrays=arrays)):
            results[label] = run_steps(model, "wan", STEPS)
    torch.testing.assert_close(results["w0"], results["reuse"], rtol=1e-5, atol=1e-6)
    assert torch.equal(results["w1"], results["pruned"])
    assert not torch.allclose(results["w0"], results["w1"])


# --- adaptive policies --------------------------------------------------------------------------------------------


def adaptive_plan(model, policy: dict) -> Plan:
    blocks = len(get_adapter(model).block_ids(model))
    return static_plan(model, np.zeros((blocks, 10), np.uint8), policy=policy)


ADACACHE = {
    "kind": "adacache",
    "probe_block": 1,
    "codebook": [[1e9, 2]],
    "moreg": {"enabled": True, "norm": 0.385, "exponent": 8.0, "gradient_scale": 10.0, "active": [0.1, 0.9]},
    "protect_first": 1,
    "protect_last": 2,
}
BWCACHE = {
    "kind": "bwcache",
    "threshold": 1e9,
    "reuse_steps": 3,
    "indicator_blocks": [0, 2],
    "protect_first": 1,
    "protect_last": 2,
    "refresh_every": 4,
}


@pytest.mark.parametrize("policy, expected", [(ADACACHE, [2, 3, 5, 6]), (BWCACHE, [2, 3, 4, 6, 7])])
def test_adaptive_policy_decisions_are_shared_by_branches(policy, expected):
    pipe = PIPELINES["wan"]()
    counts = count_block_computations(pipe.transformer)
    with apply_plan(pipe, adaptive_plan(pipe.transformer, policy)) as handle:
        video = run_pipeline(pipe, steps=10)
        reused = handle.reused_steps()
    assert reused == expected
    assert counts == [2 * (10 - len(reused))] * 3, "cond and uncond take the same decision at every step"
    assert np.isfinite(video).all()


def test_adacache_codebook_follows_the_measured_distance():
    pipe = PIPELINES["wan"]()
    policy = {**ADACACHE, "codebook": [[0.0, 5], [1e9, 1]], "moreg": {**ADACACHE["moreg"], "enabled": False}}
    with apply_plan(pipe, adaptive_plan(pipe.transformer, policy)) as handle:
        run_pipeline(pipe, steps=10)
        reused = handle.reused_steps()
    assert reused == [2, 4, 6], (
        "a positive distance selects the second codebook entry: reuse one step after each compute"
    )


def test_static_plans_never_read_tensors_on_the_host():
    model = tiny_wan().eval()
    actions = np.zeros((3, len(STEPS)), np.uint8)
    actions[1:, 2:4] = REUSE
    with apply_plan(model, static_plan(model, actions, spans=((1, 3),))):
        with (
            mock.patch.object(torch.Tensor, "item", side_effect=AssertionError("host sync")),
            mock.patch.object(torch.Tensor, "tolist", side_effect=AssertionError("host sync")),
        ):
            assert torch.isfinite(run_steps(model, "wan", STEPS)).all()


@pytest.mark.slow
def test_hundred_generations_grow_nothing():
    pipe = PIPELINES["wan"]()
    actions = np.zeros((3, 4), np.uint8)
    actions[1:, 2] = REUSE
    plan = static_plan(pipe.transformer, actions, spans=((1, 3),))

    def hook_count() -> int:
        return sum(len(m._diffusers_hook.hooks) for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook"))

    with apply_plan(pipe, plan) as handle:
        first = run_pipeline(pipe, steps=4)
        hooks = hook_count()
        peak = []
        for _ in range(100):
            assert np.array_equal(run_pipeline(pipe, steps=4), first)
            peak.append(sum(handle.cache_bytes().values()))
        assert hook_count() == hooks
    assert len(set(peak)) == 1, "cached memory after a generation is the same every time"


def _shard_run(seed: int) -> list[int]:
    """Adaptive replay on inputs drawn with `seed` (a stand-in for one rank's sequence shard); its reused steps."""
    torch.manual_seed(0)
    model = tiny_wan().eval()
    policy = {**ADACACHE, "codebook": [[0.081, 2], [1e9, 0]], "moreg": {**ADACACHE["moreg"], "enabled": False}}
    with apply_plan(model, adaptive_plan(model, policy)) as handle:
        make = make_inputs("wan", generator_seed=seed)
        latent = None
        with torch.no_grad():
            for i, t in enumerate(np.linspace(999, 1, 10)):
                kwargs = make(float(t))
                if latent is not None:
                    kwargs["hidden_states"] = latent
                with model.cache_context("cond", step_index=i, num_inference_steps=10):
                    out = model(**kwargs)[0]
                latent = kwargs["hidden_states"] + 0.3 * out
        return handle.reused_steps()


def _agreement_worker(rank: int, world: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        np.save(f"{results}.{rank}.npy", np.array(_shard_run(rank) + [-1]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_adaptive_decisions_agree_across_ranks(tmp_path):
    assert _shard_run(0) != _shard_run(1), "alone, the two shards would decide differently"
    results = str(tmp_path / "reused")
    torch.multiprocessing.spawn(_agreement_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
    assert np.array_equal(np.load(f"{results}.0.npy"), np.load(f"{results}.1.npy"))


@pytest.mark.slow
def test_torch_compile_with_a_static_plan_matches_eager():
    model = tiny_wan().eval()
    actions = np.zeros((3, len(STEPS)), np.uint8)
    actions[1:, 2:4] = REUSE
    plan = static_plan(model, actions, spans=((1, 3),))
    with apply_plan(model, plan):
        eager = run_steps(model, "wan", STEPS)
    counts = count_block_computations(model)
    compiled = torch.compile(model)
    with apply_plan(model, plan):
        out = run_steps(compiled, "wan", STEPS)
    assert counts == (plan.actions != REUSE).sum(axis=1).tolist(), "the compiled model replays the same decisions"
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)  # inductor may reorder float sums, nothing more


# --- extrapolating reuse ------------------------------------------------------------------------------------------


def _stack_residuals(model, plan) -> list[torch.Tensor]:
    """Output minus input of the whole block stack at every step of one run under `plan`."""
    blocks = model.blocks
    seen: dict[str, list[torch.Tensor]] = {"in": [], "out": []}
    handles = [
        blocks[0].register_forward_pre_hook(lambda m, args: seen["in"].append(args[0].clone())),
        blocks[-1].register_forward_hook(lambda m, args, out: seen["out"].append(out.clone())),
    ]
    try:
        with apply_plan(model, plan):
            run_steps(model, "wan", STEPS)
    finally:
        for handle in handles:
            handle.remove()
    return [o - i for i, o in zip(seen["in"], seen["out"])]


def test_extrapolating_reuse_adds_the_residual_moved_one_step_along_its_slope():
    model = tiny_wan().eval()
    actions = np.full((3, len(STEPS)), COMPUTE, np.uint8)
    actions[:, 3:5] = REUSE
    hold = static_plan(model, actions, spans=((0, 3),))
    extrapolate = hold.with_changes(policy={"kind": "static", "reuse": "extrapolate"})
    held, moved = _stack_residuals(model, hold), _stack_residuals(model, extrapolate)
    torch.testing.assert_close(held[3], held[2])
    torch.testing.assert_close(held[4], held[2])
    expected = moved[2] + (moved[2] - moved[1])
    torch.testing.assert_close(moved[3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved[4], expected, rtol=1e-5, atol=1e-5)  # held over the reuse run
    with pytest.raises(PlanError, match="reuse"):
        apply_plan(model, hold.with_changes(policy={"kind": "static", "reuse": "quadratic"}))


def test_slope_reuse_moves_the_residual_beta_j_steps_along_its_slope_at_run_position_j():
    model = tiny_wan().eval()
    actions = np.full((3, len(STEPS)), COMPUTE, np.uint8)
    actions[:, 3:6] = REUSE
    plan = static_plan(model, actions, spans=((0, 3),)).with_changes(
        policy={"kind": "static", "reuse": "slope", "slope_scale": [0.5, 1.5]}
    )
    moved = _stack_residuals(model, plan)
    slope = moved[2] - moved[1]
    torch.testing.assert_close(moved[3], moved[2] + 0.5 * slope, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved[4], moved[2] + 1.5 * slope, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved[5], moved[2] + 1.5 * slope, rtol=1e-5, atol=1e-5)  # the last β for longer runs
