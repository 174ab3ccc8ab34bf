"""ONNX export of a plan: graphs per action set, the onnxruntime driver against the torch runtime, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_runtime_advanced import random_bases

from dit_accel.defaultmodel import load_default_pipeline
from dit_accel.defaultmodel.model import position_channels
from dit_accel.export.driver import OnnxPlanRunner, denoise
from dit_accel.export.exporter import EXAMPLE_PROMPT, check_export_destination, export_onnx
from dit_accel.export.manifest import ExportError
from dit_accel.planner.cli import main
from dit_accel.runtime import COMPUTE, PRUNE, REUSE, Plan, apply_plan, fingerprint_model, load_plan

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

PROMPT = "a large blue square moves up on a black background"


@pytest.fixture(scope="module")
def pipe():
    pipeline = load_default_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _torch_and_onnx(pipe, plan: Plan, folder, guidance: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Final latents of one generation through the torch runtime and through the exported graphs."""
    cond, uncond = pipe.encode_prompt([PROMPT]), pipe.encode_prompt([""])
    noise = torch.randn(1, 12, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    with apply_plan(pipe, plan):
        expected = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            latents=noise.clone(),
            output_type="latent",
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=guidance,
        ).frames.numpy()
    positions = position_channels(noise).numpy()
    actual = denoise(OnnxPlanRunner(folder), noise.numpy(), cond.numpy(), uncond.numpy(), guidance, condition=positions)
    return expected, actual


def _relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """‖actual − expected‖ / ‖expected‖ over the whole latent (the largest single element is at float32's rounding
    floor for a 50-step CFG-5 loop: torch float32 itself is 8e-5 from a float64 transformer there; docs/onnx.md)."""
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_shipped_plan_replays_through_onnxruntime_like_the_torch_runtime(pipe, tmp_path):
    plan = load_plan("plans/default-auto-2x.plan")
    manifest = export_onnx(pipe, plan, tmp_path / "export", EXAMPLE_PROMPT)
    assert len(manifest["graphs"]) == len({tuple(a) for a in plan.actions.T})  # one graph per distinct step column
    assert len(manifest["steps"]) == plan.num_inference_steps
    reuse_graph = next(g for g in manifest["graphs"] if set(g["actions"]) == {"reuse"})
    assert reuse_graph["inputs"][-1].startswith("cache_in.") and reuse_graph["outputs"] == ["output"]
    expected, actual = _torch_and_onnx(pipe, plan, tmp_path / "export")
    assert _relative_error(expected, actual) <= 1e-4
    # the reuse graph really skips the blocks: it holds far fewer nodes than the compute graph
    import onnx

    sizes = {
        tuple(g["actions"]): len(onnx.load(str(tmp_path / "export" / g["file"]), load_external_data=False).graph.node)
        for g in manifest["graphs"]
    }
    assert sizes[tuple(["reuse"] * plan.num_blocks)] < sizes[tuple(["compute"] * plan.num_blocks)] / 3


def test_per_block_extrapolating_plan_with_pruning_and_dws_blend_matches_the_torch_runtime(pipe, tmp_path):
    # three action sets (all compute; per-block reuse with a pruned, blended block; all reuse), the second used at
    # two steps with different blend weights: one graph serves both, its weight an input of the step
    steps = 8
    actions = np.full((8, steps), COMPUTE, np.uint8)
    for step in (2, 5):
        actions[:4, step] = REUSE
        actions[6, step] = PRUNE
    actions[:, 3] = REUSE
    dws = np.ones(actions.shape, np.float32)
    dws[6, 2], dws[6, 5] = 0.3, 0.6
    arrays = {**random_bases(pipe.transformer, 16), "dws_weight": dws}
    plan = Plan(
        model=fingerprint_model(pipe.transformer),
        timesteps=np.linspace(999, 1, steps),
        actions=actions,
        arrays=arrays,
        policy={"kind": "static", "reuse": "extrapolate"},
    )
    manifest = export_onnx(pipe, plan, tmp_path / "export", EXAMPLE_PROMPT)
    assert manifest["reuse"] == "extrapolate"
    assert len(manifest["graphs"]) == 3
    assert manifest["steps"][2]["blend"] == {"blend.6": pytest.approx(0.3)}
    assert manifest["steps"][5]["blend"] == {"blend.6": pytest.approx(0.6)}
    expected, actual = _torch_and_onnx(pipe, plan, tmp_path / "export")
    assert _relative_error(expected, actual) <= 1e-4
    weights = (tmp_path / "export" / "weights.bin").stat().st_size
    params = sum(p.numel() * 4 for p in pipe.transformer.parameters())
    assert weights <= 1.1 * params  # three graphs, one copy of the weights (not five)


def test_unsupported_op_error_names_module_and_op_and_writes_nothing(pipe, tmp_path):
    @torch.library.custom_op("dittest::wobble", mutates_args=())
    def wobble(x: torch.Tensor) -> torch.Tensor:
        return x * 1.0

    wobble.register_fake(lambda x: torch.empty_like(x))
    handle = pipe.transformer.blocks[3].ffn.register_forward_hook(lambda module, args, output: wobble(output))
    plan = Plan.all_compute(fingerprint_model(pipe.transformer), np.linspace(999, 1, 4))
    try:
        with pytest.raises(ExportError, match=r"op dittest\.wobble\.default in module 'blocks\.3\.ffn'"):
            export_onnx(pipe, plan, tmp_path / "export", EXAMPLE_PROMPT)
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_adaptive_plans_and_bad_folders_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export-onnx", "plans/default-adacache-2x.plan", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "decides at run time" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="not found"):
        OnnxPlanRunner(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "dit-accel-onnx", "version": 9}))
    with pytest.raises(ExportError, match="version 9"):
        OnnxPlanRunner(tmp_path)


def test_denoise_appends_the_condition_channels_on_every_call():
    class RecordingRunner:  # stands in for OnnxPlanRunner: the transformer predicts minus its latent channels
        manifest = {"scheduler": {"timesteps": [999.0, 500.0], "sigmas": [1.0, 0.5, 0.0]}}

        def __init__(self):
            self.inputs = []

        def reset(self):
            self.inputs.clear()

        def step(self, branch, index, feeds):
            self.inputs.append((branch, index, feeds["hidden_states"].copy()))
            return -feeds["hidden_states"][:, :2]

    noise = np.ones((1, 2, 3, 4, 4), np.float32)
    condition = np.full((1, 1, 3, 4, 4), 7.0, np.float32)
    runner = RecordingRunner()
    latents = denoise(
        runner, noise, np.zeros((1, 5, 8), np.float32), np.zeros((1, 5, 8), np.float32), 5.0, condition=condition
    )
    assert [(b, i) for b, i, _ in runner.inputs] == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]
    assert all(h.shape == (1, 3, 3, 4, 4) and np.all(h[:, 2] == 7.0) for _, _, h in runner.inputs)
    np.testing.assert_allclose(runner.inputs[2][2][:, :2], 1.5)  # Euler step: 1 + (0.5 - 1) * (-1)
    assert latents.shape == noise.shape and np.allclose(latents, 2.25)


def test_export_destination_is_refused_unless_new_empty_or_an_earlier_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("user data")
    for destination in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(ExportError, match="current folder or one above it"):
            check_export_destination(destination)
    with pytest.raises(ExportError, match="current folder or one above it"):
        check_export_destination(tmp_path / "photos" / "..")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(ExportError, match="holds other files"):
        check_export_destination(folder)
    with pytest.raises(ExportError, match="not a folder"):
        check_export_destination(tmp_path / "keep.txt")
    earlier = tmp_path / "export"
    earlier.mkdir()
    (earlier / "manifest.json").write_text(json.dumps({"format": "dit-accel-onnx", "version": 1}))
    assert check_export_destination(earlier) == earlier
    assert check_export_destination(tmp_path / "new") == tmp_path / "new"
    assert (tmp_path / "keep.txt").read_text() == "user data" and (folder / "cat.jpg").exists()


def test_cli_export_to_the_current_folder_is_one_line_and_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("user data")
    plan = Path(__file__).resolve().parents[1] / "plans" / "default-auto-2x.plan"
    result = CliRunner().invoke(main, ["export-onnx", str(plan), "-o", "."])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "current folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
