"""Model adapters: lookup by class and MRO, block ids, token grids, and a clear error for unknown models."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry
from tiny_models import TINY_MODELS, make_inputs, run_steps, tiny_wan, tiny_wan_vace

from dit_accel.runtime import (
    REUSE,
    AdapterError,
    Plan,
    PlanError,
    apply_plan,
    fingerprint_model,
    get_adapter,
    load_plan,
    save_plan,
    supported_classes,
)
from dit_accel.runtime.adapters import (
    _REGISTRY,
    SAMPLES_PER_TENSOR,
    WeightsMismatchWarning,
    config_hash,
    find_transformer,
    weights_differ,
    weights_sample,
)

EXPECTED_BLOCKS = {
    "wan": ["blocks.0", "blocks.1", "blocks.2"],
    "skyreels_v2": ["blocks.0", "blocks.1", "blocks.2"],
    "cogvideox": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    "hunyuan_video": [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ],
    "ltx_video": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    "mochi": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    "wan_vace": ["blocks.0", "blocks.1", "blocks.2"],
    "flux": [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ],
    "qwen_image": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    "hunyuan_video15": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    "ltx2": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
    "sana_video": ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_adapter_block_ids_and_token_grid(name):
    model = TINY_MODELS[name]().eval()
    adapter = get_adapter(model)
    assert adapter.name == name
    assert adapter.block_ids(model) == EXPECTED_BLOCKS[name]
    for spec in adapter.attention:
        assert all(isinstance(getattr(block, spec.attr), torch.nn.Module) for _, block, _ in adapter.iter_blocks(model))
    kwargs = make_inputs(name)(500.0)
    seen = {}
    first_block = adapter.iter_blocks(model)[0][1]

    def capture(module, args, block_kwargs):
        hidden = block_kwargs.get("hidden_states", args[0] if args else None)
        seen["tokens"] = hidden.shape[1]

    first_block.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**kwargs)
    frames, height, width = adapter.token_grid(model.config, kwargs["hidden_states"], kwargs)
    assert frames * height * width == seen["tokens"]


def test_vace_spans_end_where_the_transformer_adds_control_hints():
    """Wan VACE adds a control hint after blocks 0 and 1, outside the blocks: a plan caching blocks 0-2 as one span
    replays exactly like the same plan caching each block alone (a span over a hint would add the cached hint and
    the new one both)."""
    model = tiny_wan_vace().eval()
    assert get_adapter(model).span_breaks(model) == (0, 1)
    steps = [950.0, 800.0, 600.0, 400.0]
    actions = np.zeros((3, len(steps)), np.uint8)
    actions[:, 2] = REUSE
    outputs = []
    for spans in ((), ((0, 3),)):
        plan = Plan(model=fingerprint_model(model), timesteps=np.array(steps), actions=actions, spans=spans)
        with apply_plan(model, plan):
            outputs.append(run_steps(model, "wan_vace", steps))
    assert torch.equal(*outputs)
    assert not torch.equal(outputs[0], run_steps(model, "wan_vace", steps)), "the plan reuses something"


def test_lookup_follows_the_mro():
    class MyWan(WanTransformer3DModel):
        pass

    assert get_adapter(MyWan) is get_adapter(WanTransformer3DModel)


def test_unsupported_transformer_names_class_and_supported_ones_and_how_to_register():
    with pytest.raises(AdapterError) as info:
        get_adapter(torch.nn.Linear(2, 2))
    message = str(info.value)
    assert "Linear" in message and "WanTransformer3DModel" in message and "MochiTransformer3DModel" in message
    assert "register_adapter('Linear', ModelAdapter(...))" in message and "docs/adapters.md" in message
    assert "\n" not in message
    assert len(supported_classes()) == len(TINY_MODELS) + 1  # and Cosmos, tested through its pipeline: test_cosmos.py


class MyVideoTransformer(torch.nn.Module):
    """The transformer of docs/adapters.md's worked example: blocks in `layers`, bare-tensor outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"patch_size": 2}
        self.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
        for block in self.layers:
            block.attn1, block.attn2 = torch.nn.Identity(), torch.nn.Identity()


def test_docs_worked_example_registers_an_adapter():
    """The Python block of docs/adapters.md runs as written and makes its class supported."""
    text = (Path(__file__).parent.parent / "docs" / "adapters.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    model = MyVideoTransformer()
    with pytest.raises(AdapterError):
        get_adapter(model)
    try:
        exec(code, {})
        adapter = get_adapter(model)
        assert adapter.block_ids(model) == ["layers.0", "layers.1"]
        assert adapter.token_grid(model.config, torch.zeros(1, 4, 3, 8, 8), {}) == (3, 4, 4)
    finally:
        _REGISTRY.pop("MyVideoTransformer", None)


def test_a_single_expert_plan_on_a_two_expert_pipeline_is_refused_naming_transformer_2():
    """Two-expert pipelines are supported (tests/test_two_experts.py); a plan of one expert is not silently applied
    to one of them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=tiny_wan(),
        transformer_2=tiny_wan(),
        boundary_ratio=0.875,
    )
    plan = Plan.all_compute(fingerprint_model(pipe.transformer), [999.0, 1.0])
    assert find_transformer(pipe) is pipe.transformer
    with pytest.raises(PlanError, match="plan covers transformer, the pipeline has transformer, transformer_2"):
        apply_plan(pipe, plan)
    assert "dit_plan_step" not in HookRegistry.check_if_exists_or_initialize(pipe.transformer).hooks
    pipe.transformer_2 = None  # a Wan 2.1 pipeline has the attribute, set to None
    assert find_transformer(pipe) is pipe.transformer


def test_fingerprint_tracks_config_and_samples_weights():
    a, b = tiny_wan(), tiny_wan()
    assert fingerprint_model(a) == fingerprint_model(b)  # equality is class, config and blocks
    assert fingerprint_model(a).weights != fingerprint_model(b).weights  # other random weights
    assert config_hash(tiny_wan(num_layers=4).config) != config_hash(a.config)
    assert fingerprint_model(a).block_ids == ("blocks.0", "blocks.1", "blocks.2")
    matrices = [p for block in (a.blocks[0], a.blocks[-1]) for p in block.parameters() if p.dim() >= 2]
    assert len(fingerprint_model(a).weights) == SAMPLES_PER_TENSOR * len(matrices)


def _plan_for(model: torch.nn.Module) -> Plan:
    return Plan.all_compute(fingerprint_model(model), [999.0, 500.0, 1.0])


def test_weights_sample_survives_dtype_and_plan_files(tmp_path):
    model = tiny_wan()
    plan = _plan_for(model)
    loaded = load_plan(save_plan(plan, tmp_path / "w.plan"))
    assert loaded.model.weights == plan.model.weights
    for dtype in (torch.bfloat16, torch.float16):
        assert weights_differ(plan.model.weights, copy.deepcopy(model).to(dtype)) == 0, dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_plan(copy.deepcopy(model).to(torch.bfloat16), loaded).remove()


def test_other_weights_warn_and_strict_refuses():
    model = tiny_wan()
    plan = _plan_for(model)
    fused = copy.deepcopy(model)
    with torch.no_grad():  # a rank-2 LoRA fused into the first block's query at 5% of the weights' scale
        weight = fused.blocks[0].attn1.to_q.weight
        weight += 0.05 * weight.std() * (torch.randn(weight.shape[0], 2) @ torch.randn(2, weight.shape[1]))
    with pytest.warns(WeightsMismatchWarning, match="fused LoRA, a fine-tune or another checkpoint.*dit-plan validate"):
        apply_plan(fused, plan).remove()
    with pytest.raises(PlanError, match="sampled weights differ"):
        apply_plan(fused, plan, strict_weights=True)
    assert "dit_plan_step" not in HookRegistry.check_if_exists_or_initialize(fused).hooks
    with pytest.warns(WeightsMismatchWarning):
        apply_plan(tiny_wan(), plan).remove()  # another checkpoint of the same config


def test_plans_without_weight_sample_apply_silently(tmp_path):
    model = tiny_wan()
    plan = _plan_for(model)
    old = Plan.all_compute(dataclasses.replace(plan.model, weights=None), plan.timesteps)
    path = save_plan(old, tmp_path / "old.plan")
    assert "weights" not in json.dumps(old.model.to_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_plan(tiny_wan(), load_plan(path), strict_weights=True).remove()


def test_weight_sample_costs_a_fraction_of_a_forward_pass():
    """Sampled, not hashed over every weight: taking it is cheaper than one call of the tiny model (measured side
    by side, median of several)."""
    model = tiny_wan().eval()
    kwargs = make_inputs("wan")(500.0)

    def median(fn) -> float:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[3]

    with torch.no_grad():
        assert median(lambda: weights_sample(model)) < median(lambda: model(**kwargs))


def test_runtime_import_stays_light():
    code = (
        "import sys, dit_accel.runtime; "
        "print(sorted(m for m in ('h5py', 'sklearn', 'matplotlib', 'click') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
