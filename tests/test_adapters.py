"""Model adapters: lookup by class and MRO, block ids, token grids, and a clear error for unknown models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import WanTransformer3DModel
from tiny_models import TINY_MODELS, make_inputs, tiny_wan

from dit_accel.runtime import AdapterError, fingerprint_model, get_adapter, supported_classes
from dit_accel.runtime.adapters import config_hash

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


def test_lookup_follows_the_mro():
    class MyWan(WanTransformer3DModel):
        pass

    assert get_adapter(MyWan) is get_adapter(WanTransformer3DModel)


def test_unsupported_transformer_names_class_and_supported_ones():
    with pytest.raises(AdapterError) as info:
        get_adapter(torch.nn.Linear(2, 2))
    message = str(info.value)
    assert "Linear" in message and "WanTransformer3DModel" in message and "MochiTransformer3DModel" in message
    assert len(supported_classes()) == 6


def test_fingerprint_tracks_config_not_weights():
    a, b = tiny_wan(), tiny_wan()
    assert fingerprint_model(a) == fingerprint_model(b)
    assert config_hash(tiny_wan(num_layers=4).config) != config_hash(a.config)
    assert fingerprint_model(a).block_ids == ("blocks.0", "blocks.1", "blocks.2")


def test_runtime_import_stays_light():
    code = (
        "import sys, dit_accel.runtime; "
        "print(sorted(m for m in ('h5py', 'sklearn', 'matplotlib', 'click') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
