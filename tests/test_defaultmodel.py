"""Tests of the embedded default model: data, tokenizer, pipeline, I/O and the evaluator."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from PIL import Image

from dit_accel import defaultmodel
from dit_accel.defaultmodel import TinyVideoPipeline, WordTokenizer, load_default_pipeline
from dit_accel.defaultmodel.data import SPEEDS, TRAIN_SEED_MIN, make_batch, make_sample
from dit_accel.defaultmodel.evaluate import analyse_video, score
from dit_accel.defaultmodel.model import (
    POSITION_CHANNELS,
    WAN_CONFIG,
    latents_to_pixels,
    pixels_to_latents,
    with_positions,
)
from dit_accel.defaultmodel.sample import main as demo_main
from dit_accel.defaultmodel.train import Trainer, parse_args
from dit_accel.defaultmodel.video_io import save_gif, save_png_grid

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

PROMPT = "a large red circle moves right on a black background"


@pytest.fixture(scope="module")
def pipe() -> TinyVideoPipeline:
    """The shipped pipeline, loaded with the hub forced offline."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        pipeline = load_default_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data_frames(seed: int) -> np.ndarray:
    """Ground-truth video of ``seed`` as [F, H, W, 3] in [0, 1]."""
    return ((make_sample(seed).video.permute(1, 2, 3, 0) + 1) / 2).numpy()


# --- data ---------------------------------------------------------------------------


def test_same_seed_gives_identical_sample_and_different_seeds_differ() -> None:
    a, b, c = make_sample(7), make_sample(7), make_sample(8)
    assert torch.equal(a.video, b.video) and a.caption == b.caption and a.label == b.label
    assert not torch.equal(a.video, c.video)


def test_samples_have_expected_shape_range_and_consistent_labels() -> None:
    videos, captions, labels = make_batch(list(range(40)))
    assert videos.shape == (40, 3, 8, 32, 32)
    assert videos.min() >= -1.0 and videos.max() <= 1.0
    for caption, label in zip(captions, labels):
        words = caption.split()
        assert {label["shape"], label["colour"], label["size"], label["background"]} <= set(words)
        assert ("still" in words) == (label["direction"] == "still")
        assert label["direction"] == "still" or label["speed"] >= min(SPEEDS) >= 1.5


def test_moving_samples_actually_move_and_still_ones_do_not() -> None:
    for seed in range(30):
        frames, label = _data_frames(seed), make_sample(seed).label
        moved = np.abs(frames[-1] - frames[0]).max() > 0.1
        assert moved == (label["direction"] != "still")


# --- tokenizer and text -------------------------------------------------------------------


def test_every_caption_tokenizes_and_round_trips() -> None:
    tok = WordTokenizer.from_package()
    for seed in list(range(100)) + list(range(TRAIN_SEED_MIN, TRAIN_SEED_MIN + 100)):
        caption = make_sample(seed).caption
        ids = tok(caption)
        assert ids.shape == (1, tok.max_length)
        assert tok.decode(ids[0]) == caption


def test_unknown_word_error_names_the_word_and_the_vocabulary() -> None:
    tok = WordTokenizer.from_package()
    with pytest.raises(ValueError) as err:
        tok("a pink circle moves left on a black background")
    message = str(err.value)
    assert "pink" in message
    for category in ("colours", "shapes", "sizes", "directions", "backgrounds"):
        assert f"{category}:" in message
    assert "circle" in message and "teal" in message


def test_tokenizer_save_and_load_round_trip(tmp_path) -> None:
    tok = WordTokenizer.from_package()
    tok.save_pretrained(tmp_path)
    loaded = WordTokenizer.from_pretrained(tmp_path)
    assert loaded.id_to_word == tok.id_to_word and loaded.max_length == tok.max_length
    assert torch.equal(loaded(PROMPT), tok(PROMPT))


def test_space_to_depth_is_exactly_invertible() -> None:
    video = torch.randn(2, 3, 8, 32, 32)
    latents = pixels_to_latents(video)
    assert latents.shape == (2, 12, 8, 16, 16)
    assert torch.equal(latents_to_pixels(latents), video)


# --- pipeline ---------------------------------------------------------------------------


def test_shipped_model_has_the_documented_architecture(pipe: TinyVideoPipeline) -> None:
    config = pipe.transformer.config
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert config.num_layers == WAN_CONFIG["num_layers"] >= 8
    assert tuple(config.patch_size) == (1, 2, 2) and config.out_channels == 12
    assert config.in_channels == 12 + POSITION_CHANNELS


def test_position_channels_span_each_axis_and_leave_the_latents_alone() -> None:
    latents = torch.randn(2, 12, 8, 16, 16)
    model_input = with_positions(latents)
    assert model_input.shape == (2, 12 + POSITION_CHANNELS, 8, 16, 16)
    assert torch.equal(model_input[:, :12], latents)
    frame, row, column = model_input[0, 12:]
    assert torch.equal(frame[:, 0, 0], torch.linspace(-1, 1, 8))
    assert torch.equal(row[3, :, 5], torch.linspace(-1, 1, 16)) and torch.equal(column[3, 5], torch.linspace(-1, 1, 16))
    assert torch.equal(model_input[0, 12:], model_input[1, 12:])


def test_pipeline_rejects_a_transformer_without_room_for_the_position_channels() -> None:
    from diffusers import WanTransformer3DModel

    from dit_accel.defaultmodel.model import build_scheduler, build_text_encoder

    tokenizer = WordTokenizer.from_package()
    transformer = WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=12,
        out_channels=12,
        text_dim=128,
        ffn_dim=16,
        num_layers=1,
    )
    with pytest.raises(ValueError, match="in_channels = out_channels \\+ 3"):
        TinyVideoPipeline(transformer, build_scheduler(), build_text_encoder(tokenizer), tokenizer)


def test_default_pipeline_generates_finite_videos_in_every_output_type(pipe: TinyVideoPipeline) -> None:
    prompts = [PROMPT, "a small blue square stands still on a gray background"]
    frames = pipe(prompts, num_inference_steps=2, generator=_generator()).frames
    assert frames.shape == (2, 8, 32, 32, 3) and frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0
    pt = pipe(PROMPT, num_inference_steps=2, generator=_generator(), output_type="pt").frames
    assert pt.shape == (1, 8, 3, 32, 32)
    latent = pipe(PROMPT, num_inference_steps=2, generator=_generator(), output_type="latent").frames
    assert latent.shape == (1, 12, 8, 16, 16)


def test_same_generator_seed_reproduces_and_embeds_match_prompts(pipe: TinyVideoPipeline) -> None:
    a = pipe(PROMPT, num_inference_steps=2, generator=_generator(3), output_type="pt").frames
    b = pipe(
        prompt_embeds=pipe.encode_prompt(PROMPT),
        negative_prompt_embeds=pipe.encode_prompt(""),
        num_inference_steps=2,
        generator=_generator(3),
        output_type="pt",
    ).frames
    c = pipe(PROMPT, num_inference_steps=2, generator=_generator(4), output_type="pt").frames
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


class _ContextRecorder(ModelHook):
    """Stateful hook that records the cache context of every transformer call."""

    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.state_manager = StateManager(BaseState)
        self.seen: list[tuple[str, int, int]] = []

    def pre_forward(self, module, *args, **kwargs):
        ctx = self.state_manager.context
        self.seen.append((ctx.name, ctx.step_index, ctx.num_inference_steps))
        return args, kwargs

    def reset_state(self, module):
        return module


@pytest.mark.parametrize("guidance, branches", [(5.0, ("cond", "uncond")), (1.0, ("cond",))])
def test_transformer_calls_run_inside_cond_and_uncond_cache_contexts(pipe, guidance, branches) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    recorder = _ContextRecorder()
    registry.register_hook(recorder, "context_recorder")
    try:
        pipe(PROMPT, num_inference_steps=3, guidance_scale=guidance, generator=_generator())
    finally:
        registry.remove_hook("context_recorder")
    assert recorder.seen == [(name, i, 3) for i in range(3) for name in branches]


def test_pipeline_save_and_load_round_trip(tmp_path) -> None:
    pipe = TinyVideoPipeline.from_scratch()
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = TinyVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "latent"}
    a = pipe(PROMPT, generator=_generator(), **kwargs).frames
    b = loaded(PROMPT, generator=_generator(), **kwargs).frames
    assert torch.equal(a, b)


def test_low_precision_load_keeps_wan_fp32_modules_and_still_generates() -> None:
    pipe = load_default_pipeline(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    frames = pipe(PROMPT, num_inference_steps=1, generator=_generator()).frames
    assert np.isfinite(frames).all()


def test_missing_weights_folder_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(defaultmodel, "WEIGHTS_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="export-only"):
        load_default_pipeline()


def test_shipped_weights_are_small_safetensors() -> None:
    files = [p for p in defaultmodel.WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in files)


# --- video files --------------------------------------------------------------------------


def test_gif_and_png_grid_are_written(tmp_path) -> None:
    videos = np.stack([_data_frames(0), _data_frames(1)])
    gif = save_gif(videos[0], tmp_path / "v.gif", scale=4)
    grid = save_png_grid(videos, tmp_path / "g.png", scale=2)
    with Image.open(gif) as im:
        assert im.n_frames == 8 and im.size == (128, 128)
    with Image.open(grid) as im:
        assert im.size == (8 * 64, 2 * 64)
    with pytest.raises(ValueError):
        save_gif(videos, tmp_path / "bad.gif")


def test_demo_writes_gif_and_png_grid(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo_main(["--out", str(tmp_path), "--steps", "2", "--prompt", PROMPT])
    assert (tmp_path / "video.gif").is_file() and (tmp_path / "frames.png").is_file()
    assert "video.gif" in capsys.readouterr().out


# --- evaluator and training -------------------------------------------------------------


def test_evaluator_scores_ground_truth_perfectly_and_catches_wrong_videos() -> None:
    seeds = list(range(40))
    labels = [make_sample(s).label for s in seeds]
    truth = score([analyse_video(_data_frames(s)) for s in seeds], labels)
    assert truth["foreground_colour"] == truth["background_colour"] == truth["direction"] == 1.0
    reversed_time = score([analyse_video(_data_frames(s)[::-1]) for s in seeds], labels)
    assert reversed_time["direction"] == 0.0
    shuffled = score([analyse_video(_data_frames(s)) for s in seeds], labels[1:] + labels[:1])
    assert shuffled["background_colour"] < 0.8


def test_trainer_checkpoint_restores_data_and_noise_streams() -> None:
    args = parse_args(["--batch-size", "2"])
    trainer = Trainer(args)
    trainer.batch()
    state = trainer.state_dict()
    expected_latents, expected_ids, expected_directions = trainer.batch()
    expected_sigmas = trainer.sample_sigmas(4)
    resumed = Trainer(argparse.Namespace(**vars(args)))
    resumed.load_state_dict(state)
    latents, ids, directions = resumed.batch()
    assert torch.equal(latents, expected_latents) and torch.equal(ids, expected_ids)
    assert torch.equal(directions, expected_directions)
    assert torch.equal(resumed.sample_sigmas(4), expected_sigmas)


def test_changed_captions_change_only_their_category() -> None:
    from dit_accel.defaultmodel.binding import changed_captions

    tok = WordTokenizer.from_package()
    for seed in range(60):
        sample = make_sample(seed)
        changed = changed_captions(sample.label, seed)
        assert ("direction" in changed) == (sample.label["direction"] != "still")
        true_words = sample.caption.split()
        for category, caption in changed.items():
            tok(caption)  # every changed caption stays inside the vocabulary
            words = caption.split()
            diff = [(a, b) for a, b in zip(true_words, words) if a != b]
            assert len(words) == len(true_words) and 1 <= len(diff) <= 2, (category, caption)
            expected = {
                "colour": "colours",
                "shape": "shapes",
                "size": "sizes",
                "background": "backgrounds",
                "direction": "directions",
            }[category]
            assert all(b in tok.categories[expected] for _, b in diff), (category, diff)


def test_binding_probe_sees_that_the_shipped_model_reads_colour_words(pipe: TinyVideoPipeline) -> None:
    from dit_accel.defaultmodel.binding import CHANGES, binding_ratios

    ratios = binding_ratios(pipe, n=8, sigmas=(0.9,))
    assert set(ratios) == set(CHANGES) and all(set(r) == {"0.9"} for r in ratios.values())
    assert ratios["background"]["0.9"] > 1.5 and ratios["colour"]["0.9"] > 1.05


@pytest.mark.parametrize("argv", [["--n", "0"], ["--sigmas", "0.5", "1.5"]])
def test_binding_cli_rejects_bad_arguments_before_loading_anything(argv, capsys) -> None:
    from dit_accel.defaultmodel.binding import main as binding_main

    with pytest.raises(SystemExit) as exit_info:
        binding_main(argv)
    assert exit_info.value.code == 2 and "error: --" in capsys.readouterr().err


def test_checkpoint_from_before_the_position_channels_keeps_its_weights_and_initialises_the_new_ones() -> None:
    args = parse_args(["--batch-size", "2"])
    trainer = Trainer(args)
    state = trainer.state_dict()
    key = "transformer.patch_embedding.weight"
    for weights in (state["model"], state["ema"]):
        weights[key] = weights[key][:, :12].clone()  # what a 12-input-channel checkpoint held
    old = trainer.model["transformer"].patch_embedding.weight.detach()[:, :12].clone()
    resumed = Trainer(argparse.Namespace(**vars(args)))
    fresh = resumed.model["transformer"].patch_embedding.weight.detach()[:, 12:].clone()
    resumed.load_state_dict(state)
    for model in (resumed.model, resumed.ema):
        widened = model["transformer"].patch_embedding.weight.detach()
        assert torch.equal(widened[:, :12], old) and torch.equal(widened[:, 12:], fresh) and fresh.abs().min() > 0
    assert resumed.warmup_from == state["step"] and resumed.lr_at(state["step"]) < args.lr


def test_direction_head_labels_follow_the_captions_and_skip_dropped_ones() -> None:
    from dit_accel.defaultmodel.data import DIRECTIONS
    from dit_accel.defaultmodel.train import DIRECTION_INDEX

    trainer = Trainer(parse_args(["--batch-size", "12", "--caption-dropout", "0.5"]))
    _, ids, directions = trainer.batch()
    tok = trainer.tokenizer
    for row, direction in zip(ids.tolist(), directions.tolist()):
        words = tok.decode(row).split()
        if direction == -1:
            assert words == []  # dropped caption
        else:
            name = list(DIRECTIONS)[direction]
            assert DIRECTION_INDEX[name] == direction
            expected = ["still"] if name == "still" else name.split("-")
            assert words[-4 - len(expected) : -4] == expected  # "... <direction words> on a <bg> background"
    assert (directions == -1).any() and (directions >= 0).any()
    loss = trainer.step()
    assert np.isfinite(loss) and trainer.direction_head.linear.weight.grad is not None
