"""dit-profile on the embedded default model: bit-identical recording, schema, resume, shards, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dit_accel.harness.pipelines import generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec, read_prompt_file
from dit_accel.profiler.recorder import Recorder, RecordSettings
from dit_accel.profiler.run import merge_profiles, profile_prompts
from dit_accel.profiler.schema import FIELDS, ProfileError, open_profile, seal
from dit_accel.runtime import get_adapter

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

STEPS = 4
PROMPTS = [
    PromptSpec("a large red circle moves right on a blue background", "", 0),
    PromptSpec("a large yellow square stands still on a black background", "", 1),
    PromptSpec("a small white triangle moves up on a green background", "", 2),
]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


@pytest.fixture(scope="module")
def profile_path(pipe, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "default.h5"
    profile_prompts(pipe, PROMPTS[:2], path, RecordSettings(num_inference_steps=STEPS), progress=False)
    return path


def test_recording_leaves_outputs_bit_identical(pipe):
    baseline = generate(pipe, PROMPTS[0], STEPS, 5.0, {})
    recorder = Recorder(
        pipe.transformer, get_adapter(pipe.transformer), RecordSettings(num_inference_steps=STEPS, attention_every=1)
    )
    recorder.begin_prompt(0)
    with torch.no_grad():
        observed = generate(pipe, PROMPTS[0], STEPS, 5.0, {})
    arrays = recorder.collect(("cond", "uncond"))
    recorder.remove()
    assert np.array_equal(observed, baseline)
    assert np.isfinite(arrays["residual_rel_l1"][:, 1:]).all() and np.isnan(arrays["residual_rel_l1"][:, 0]).all()
    assert arrays["attention_received"].shape[0] == STEPS
    assert np.array_equal(generate(pipe, PROMPTS[0], STEPS, 5.0, {}), baseline), (
        "removing the probes restores the model"
    )


def test_profile_schema_and_contents(profile_path):
    profile = open_profile(profile_path)
    header = profile.header
    assert [p.prompt for p in profile.prompts] == [p.prompt for p in PROMPTS[:2]]
    assert header.fingerprint.transformer_class == "WanTransformer3DModel" and len(header.fingerprint.block_ids) >= 8
    blocks, grid = len(profile.block_ids), header.grid
    assert header.timesteps.shape == (STEPS,) and header.branches == ("cond", "uncond")
    assert profile.stack("residual_rel_l1").shape == (2, 2, STEPS, blocks)
    assert profile.stack("model_output_rel_l1").shape == (2, 2, STEPS)
    received = profile.stack("attention_received")
    assert received.shape[2:] == (blocks, *grid)
    # Attention each token receives is a mean over softmax rows: it sums to 1 over the grid.
    np.testing.assert_allclose(received.astype(np.float64).sum(axis=(3, 4, 5)), 1.0, rtol=5e-3)
    assert profile.stack("foreground").shape == (2, *grid)
    features = profile.stack("feature_queries")
    assert features.shape[1] == blocks and features.shape[3:] == (4, 32)
    assert (header.block_flops > 0).all() and header.block_flops.sum() < header.model_flops
    with h5py.File(profile_path) as f:
        group = f["prompts"][profile.prompts[0].key]
        for spec in FIELDS.values():
            if spec.path in group:
                assert tuple(json.loads(group[spec.path].attrs["dims"])) == spec.dims


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("# calibration\nfirst prompt\n\nsecond prompt\n")
    assert [(p.prompt, p.seed) for p in read_prompt_file(tmp_path / "p.txt")] == [
        ("first prompt", 0),
        ("second prompt", 1),
    ]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "negative_prompt": "b", "seed": 7}\n')
    assert read_prompt_file(tmp_path / "p.jsonl") == [PromptSpec("a", "b", 7)]
    (tmp_path / "bad.jsonl").write_text('{"negative_prompt": "b"}\n')
    with pytest.raises(Exception, match="needs a non-empty string 'prompt'"):
        read_prompt_file(tmp_path / "bad.jsonl")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dit_accel.profiler", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "cannot read prompts file"),
        ("empty", "holds no prompt"),
        ("model", "is not a local diffusers pipeline"),
        ("folder", "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("" if case == "empty" else "a red circle moves left on a blue background\n")
    output = tmp_path / ("nowhere/x.h5" if case == "folder" else "x.h5")
    args = ["--prompts", str(tmp_path / "absent.txt") if case == "missing" else str(prompts), "-o", str(output)]
    if case == "model":
        args += ["--model", str(tmp_path)]
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not output.exists()


def test_existing_profile_of_another_run_is_refused(profile_path, pipe, tmp_path):
    with pytest.raises(Exception, match="already exists; pass --resume"):
        profile_prompts(pipe, PROMPTS, profile_path, RecordSettings(num_inference_steps=STEPS), progress=False)
    with pytest.raises(Exception, match="different settings"):
        profile_prompts(
            pipe, PROMPTS, profile_path, RecordSettings(num_inference_steps=STEPS + 1), resume=True, progress=False
        )


def test_corrupt_profile_is_refused(profile_path, tmp_path):
    data = profile_path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(ProfileError):
        open_profile(tmp_path / "cut.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ProfileError, match="not a dit-profile file"):
        open_profile(tmp_path / "text.h5")


def _same_data(a: Path, b: Path) -> None:
    pa, pb = open_profile(a), open_profile(b)
    assert [p.index for p in pa.prompts] == [p.index for p in pb.prompts]
    for name in ("residual_rel_l1", "output_cos", "motion", "attention_received", "foreground", "feature_keys"):
        np.testing.assert_array_equal(pa.stack(name), pb.stack(name))


def test_merge_shards_and_refuse_other_models(pipe, tmp_path, profile_path):
    settings = RecordSettings(num_inference_steps=STEPS)
    shard = tmp_path / "shard1.h5"
    profile_prompts(pipe, PROMPTS, shard, settings, rank=1, world_size=2, progress=False)
    assert [p.index for p in open_profile(shard).prompts] == [1]
    first = tmp_path / "shard0.h5"
    profile_prompts(pipe, PROMPTS, first, settings, rank=0, world_size=2, progress=False)
    merged = tmp_path / "merged.h5"
    assert merge_profiles([first, shard], merged) == 3
    assert [p.index for p in open_profile(merged).prompts] == [0, 1, 2]
    with pytest.raises(Exception, match="appears in more than one profile"):
        merge_profiles([first, merged], tmp_path / "dup.h5")
    other = tmp_path / "other.h5"
    other.write_bytes(profile_path.read_bytes())
    with h5py.File(other, "a") as f:
        fingerprint = json.loads(f.attrs["model_fingerprint"])
        f.attrs["model_fingerprint"] = json.dumps({**fingerprint, "config_hash": "f" * 64})
    with pytest.raises(ProfileError, match="does not match its checksum"):
        open_profile(other)
    seal(other)
    with pytest.raises(Exception, match="profiles are of different models"):
        merge_profiles([merged, other], tmp_path / "mixed.h5")
    assert not (tmp_path / "dup.h5").exists() and not (tmp_path / "mixed.h5").exists()


def _distributed_worker(rank: int, world: int, init_file: str, prompts_path: str, output: str) -> None:
    import torch.distributed as dist

    from dit_accel.profiler.run import profile_distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        profile_distributed(
            load_pipeline(None),
            read_prompt_file(prompts_path),
            output,
            RecordSettings(num_inference_steps=STEPS),
            progress=False,
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_shard_and_merge(tmp_path, pipe):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(p.prompt + "\n" for p in PROMPTS))
    output = tmp_path / "dist.h5"
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(prompts), str(output)), nprocs=2
    )
    merged = open_profile(output)
    assert [p.index for p in merged.prompts] == [0, 1, 2]
    assert not list(tmp_path.glob("dist.rank*.h5")), "shards are removed after the merge"
    single = tmp_path / "single.h5"
    profile_prompts(pipe, read_prompt_file(prompts), single, RecordSettings(num_inference_steps=STEPS), progress=False)
    _same_data(output, single)


def colour_segmentation(video: np.ndarray, grid: tuple[int, int, int], threshold: float = 0.25) -> np.ndarray:
    """Token-grid mask of pixels whose colour is far from their frame's median (background) colour."""
    pixels = video.astype(np.float64) / 255.0
    background = np.median(pixels.reshape(pixels.shape[0], -1, 3), axis=1)[:, None, None, :]
    far = np.linalg.norm(pixels - background, axis=-1) > threshold
    frames, height, width = grid
    cells = far.reshape(frames, -1, height, far.shape[1] // height, width, far.shape[2] // width)
    return cells.mean(axis=(1, 3, 5)) >= 0.5


def test_token_features_leave_out_the_conditioning_channels_a_pipeline_appends():
    from dit_accel.profiler.foreground import latent_to_token_features

    latent = np.random.default_rng(0).normal(size=(4, 2, 6, 8)).astype(np.float32)  # C F H W, patch (1, 2, 2)
    ramp = np.broadcast_to(np.linspace(-1, 1, 8, dtype=np.float32), (2, 6, 8))
    with_condition = np.concatenate([latent, ramp[None]], axis=0)
    features = latent_to_token_features(with_condition, "CFHW", (1, 2, 2), (2, 3, 4), latent_channels=4)
    assert features.shape == (2, 3, 4, 16)
    assert np.array_equal(features, latent_to_token_features(latent, "CFHW", (1, 2, 2), (2, 3, 4)))
    assert features[0, 1, 2, 0] == latent[0, 0, 2, 4]  # channel 0, token (row 1, col 2), pixel (0, 0) of its patch


def test_foreground_mask_matches_the_generated_shape(pipe, tmp_path):
    prompts = [
        PromptSpec("a large red circle moves right on a blue background", "", 3),
        PromptSpec("a large yellow square stands still on a black background", "", 4),
        PromptSpec("a large white triangle moves down on a green background", "", 5),
    ]
    path = tmp_path / "fg.h5"
    settings = RecordSettings(
        num_inference_steps=25, record_attention=False, record_features=False, sensitivity_steps=0, reuse_lags=0
    )
    profile_prompts(pipe, prompts, path, settings, progress=False)
    profile = open_profile(path)
    for index in range(len(prompts)):
        mask = profile.read(index, "foreground").astype(bool)
        truth = colour_segmentation(profile.read(index, "video"), profile.header.grid)
        iou = (mask & truth).sum() / max((mask | truth).sum(), 1)
        assert iou >= 0.6, f"prompt {index}: IoU {iou:.2f}"


def test_step_sensitivity_is_measured_on_the_first_prompt_and_matches_a_replayed_reuse(pipe, profile_path):
    from dit_accel.runtime import COMPUTE, REUSE, Plan, apply_plan, fingerprint_model

    profile = open_profile(profile_path)
    assert [profile.recorded(p, "step_sensitivity") for p in profile.prompts] == [True, False]
    measured = profile.read(0, "step_sensitivity")
    steps = np.flatnonzero(np.isfinite(measured)).tolist()
    assert steps == [1, 2]  # spread over 1 … STEPS − 2
    assert (measured[steps] > 0).all()
    # independently: reuse every block at step 1 and compare final latents with the full run
    spec = PROMPTS[0]

    def latent() -> torch.Tensor:
        return pipe(
            prompt=spec.prompt,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(spec.seed),
            output_type="latent",
        ).frames

    full = latent()
    actions = np.full((8, STEPS), COMPUTE, np.uint8)
    actions[:, 1] = REUSE
    with apply_plan(
        pipe, Plan(model=fingerprint_model(pipe.transformer), timesteps=np.linspace(999, 0, STEPS), actions=actions)
    ):
        reused = latent()
    assert measured[1] == pytest.approx(float((reused - full).norm() / full.norm()), rel=1e-5)


def test_guider_context_names_are_the_cfg_branches(pipe, tmp_path, monkeypatch):
    """Pipelines built on diffusers' guiders (HunyuanVideo 1.5) name their calls `pred_cond` / `pred_uncond`."""
    transformer = pipe.transformer
    named = transformer.cache_context
    guider_names = {"cond": "pred_cond", "uncond": "pred_uncond"}
    monkeypatch.setattr(transformer, "cache_context", lambda name, **kwargs: named(guider_names[name], **kwargs))
    path = tmp_path / "guider.h5"
    settings = RecordSettings(num_inference_steps=2, record_attention=False, sensitivity_steps=0)
    profile_prompts(pipe, PROMPTS[:1], path, settings, progress=False)
    profile = open_profile(path)
    assert profile.header.branches == ("cond", "uncond")
    drift = profile.stack("residual_rel_l1")[0, :, 1]
    assert np.isfinite(drift).all() and not np.array_equal(drift[0], drift[1])
