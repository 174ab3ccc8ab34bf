"""Attention-level caching (policy `cache_level: attention`, UniCP's level): a reuse cell runs the block, but its
self-attention returns the output cached at the block's last computed step; cross-attention and FFN still run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import run_steps, tiny_wan

from dit_accel.runtime import REUSE, Plan, PlanError, apply_plan, fingerprint_model, load_plan, save_plan
from dit_accel.runtime.plan import plan_to_bytes

STEPS = [950.0, 800.0, 600.0, 400.0, 200.0, 50.0]
ATTENTION = {"kind": "static", "cache_level": "attention"}


def attention_plan(model, reuse_steps=(2, 3), blocks=(1, 2), policy=None) -> Plan:
    """Reuse the self-attention of `blocks` at `reuse_steps`."""
    fingerprint = fingerprint_model(model)
    actions = np.zeros((len(fingerprint.block_ids), len(STEPS)), np.uint8)
    for block in blocks:
        actions[block, list(reuse_steps)] = REUSE
    return Plan(model=fingerprint, timesteps=STEPS, actions=actions, policy=policy or ATTENTION)


def counters(model) -> dict[str, list[int]]:
    """Per block, independent counts of computed self-attention (attn1's query projection), cross-attention
    (attn2's) and feed-forward calls, read with torch's own forward pre-hooks."""
    counts = {"self": [0] * len(model.blocks), "cross": [0] * len(model.blocks), "ffn": [0] * len(model.blocks)}
    for index, block in enumerate(model.blocks):
        for name, module in (("self", block.attn1.to_q), ("cross", block.attn2.to_q), ("ffn", block.ffn)):
            module.register_forward_pre_hook(lambda *_, n=name, i=index: counts[n].__setitem__(i, counts[n][i] + 1))
    return counts


def test_attention_reuse_runs_the_block_but_not_its_self_attention():
    model = tiny_wan().eval()
    counts = counters(model)
    plan = attention_plan(model)
    with apply_plan(model, plan):
        run_steps(model, "wan", STEPS)
    assert counts["self"] == (plan.actions != REUSE).sum(axis=1).tolist() == [6, 4, 4]
    assert counts["cross"] == counts["ffn"] == [len(STEPS)] * 3


def test_a_reused_self_attention_returns_the_output_of_the_last_computed_step():
    model = tiny_wan().eval()
    outputs: list[torch.Tensor] = []
    model.blocks[1].attn1.register_forward_hook(lambda _m, _a, out: outputs.append(out.clone()))
    with apply_plan(model, attention_plan(model, reuse_steps=(2, 3))):
        run_steps(model, "wan", STEPS)
    assert len(outputs) == len(STEPS)
    assert torch.equal(outputs[2], outputs[1]) and torch.equal(outputs[3], outputs[1])
    assert not torch.equal(outputs[4], outputs[1])


def test_attention_reuse_differs_from_block_reuse_and_removal_restores():
    model = tiny_wan().eval()
    baseline = run_steps(model, "wan", STEPS)
    with apply_plan(model, attention_plan(model)):
        attention_level = run_steps(model, "wan", STEPS)
    with apply_plan(model, attention_plan(model, policy={"kind": "static"})):
        block_level = run_steps(model, "wan", STEPS)
    assert torch.isfinite(attention_level).all()
    assert not torch.equal(attention_level, baseline) and not torch.equal(attention_level, block_level)
    assert torch.equal(run_steps(model, "wan", STEPS), baseline)


def test_all_compute_attention_level_plan_is_bit_identical():
    model = tiny_wan().eval()
    baseline = run_steps(model, "wan", STEPS)
    plan = Plan.all_compute(fingerprint_model(model), STEPS, policy=ATTENTION)
    with apply_plan(model, plan):
        assert torch.equal(run_steps(model, "wan", STEPS), baseline)


def test_cache_memory_counts_the_cached_attention_outputs():
    """Blocks 1 and 2 keep one self-attention output each, of the shape attn1 returns."""
    model = tiny_wan().eval()
    shapes: list[torch.Size] = []
    model.blocks[1].attn1.register_forward_hook(lambda _m, _a, out: shapes.append(out.shape))
    with apply_plan(model, attention_plan(model)) as handle:
        run_steps(model, "wan", STEPS)
        held = handle.cache_bytes()["cond"]
    per_output = int(np.prod(shapes[0])) * torch.finfo(torch.float32).bits // 8
    assert held == 2 * per_output > 0


def test_a_plan_without_cache_level_loads_byte_identically(tmp_path):
    model = tiny_wan()
    plan = attention_plan(model, policy={"kind": "static"})
    path = save_plan(plan, tmp_path / "old.plan")
    loaded = load_plan(path)
    assert "cache_level" not in loaded.policy
    assert plan_to_bytes(loaded) == path.read_bytes()


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"kind": "static", "cache_level": "layer"}, "cache_level' is 'layer'"),
        ({"kind": "static", "cache_level": "attention", "reuse": "slope", "slope_scale": [1.0]}, "holds its cache"),
        ({"kind": "static", "cache_level": ["attention"]}, "this runtime knows block, attention"),
    ],
)
def test_an_invalid_cache_level_is_refused_in_one_line(policy, message):
    with pytest.raises(PlanError, match=message) as info:
        attention_plan(tiny_wan(), policy=policy)
    assert "\n" not in str(info.value)
