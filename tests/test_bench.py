"""dit-bench: one reduced-grid run on the default model (report contents, output files, skipped work), bad input as
one error line with nothing written, and the measuring pieces on their own."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import run_steps, tiny_cogvideox, tiny_wan

from dit_accel.bench import BenchError
from dit_accel.bench.cli import main
from dit_accel.bench.measure import CallCounter, caching_bound, hook_state_bytes
from dit_accel.bench.models import WAN_1_3B_CONFIG, random_transformer
from dit_accel.bench.peers import PEERS, not_applicable, peer_enabled, peer_settings, taylorseer_identifiers
from dit_accel.bench.report import frontier, matched, render_markdown, standing, write_outputs
from dit_accel.bench.runner import bracketed
from dit_accel.bench.variants import peer_variants
from dit_accel.planner.synthetic import SyntheticSpec, write_synthetic_profile
from dit_accel.runtime import REUSE, Plan, fingerprint_model, get_adapter, load_plan, save_plan

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

STEPS, BLOCKS = 4, 8
SIZE = ("--frames", "2", "--height", "16", "--width", "16")
PROMPT = "a large red circle moves right on a black background"
CALIBRATION = "a small green triangle moves left on a teal background"
HAND_REUSED = 4 * 2 * 2  # blocks 2-5 reused at steps 1 and 2, both CFG branches


class MeanAbsolute(torch.nn.Module):
    """A stand-in LPIPS network with the interface the bench expects: model(x, y) -> one distance per image."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean(dim=(1, 2, 3))


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def inf_floats(value):
    """The JSON report with "inf" strings read back as floats."""
    if isinstance(value, dict):
        return {k: inf_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [inf_floats(v) for v in value]
    return float(value) if value in ("inf", "-inf") else value


@pytest.fixture(scope="module")
def fingerprint():
    from dit_accel.defaultmodel import load_default_pipeline

    return fingerprint_model(load_default_pipeline().transformer)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fingerprint):
    """A hand-made plan, a synthetic profile of the default model to fit `auto` from, prompts and LPIPS weights."""
    root = tmp_path_factory.mktemp("bench-inputs")
    actions = np.zeros((BLOCKS, STEPS), np.uint8)
    actions[2:6, [1, 2]] = REUSE
    plan = Plan(
        model=fingerprint,
        timesteps=np.linspace(999.0, 0.0, STEPS),
        actions=actions,
        spans=((2, 6),),
        provenance={"method": "hand"},
    )
    spec = SyntheticSpec(
        steps=STEPS,
        blocks=BLOCKS,
        config_hash=fingerprint.config_hash,
        prompts=1,
        omit=("feature_queries", "feature_keys"),
    )
    (root / "prompts.txt").write_text(PROMPT + "\n")
    (root / "calibration.txt").write_text(CALIBRATION + "\n")
    torch.jit.script(MeanAbsolute()).save(str(root / "lpips.pt"))
    return {
        "plan": save_plan(plan, root / "hand.plan"),
        "profile": write_synthetic_profile(root / "synthetic.h5", spec),
        "prompts": root / "prompts.txt",
        "calibration": root / "calibration.txt",
        "lpips": root / "lpips.pt",
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory, inputs):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = run(
        "--out",
        out,
        "--plan",
        inputs["plan"],
        "--profile",
        inputs["profile"],
        "--fit",
        "--quick",
        "--budgets",
        "1.25",
        "--peers",
        "fbc,taylorseer,magcache,fastercache",
        "--thresholds",
        "fbc=0",
        "--thresholds",
        "taylorseer=2",
        "--thresholds",
        "magcache=0.3",
        "--prompts",
        inputs["prompts"],
        "--calibration-prompts",
        inputs["calibration"],
        "--steps",
        STEPS,
        "--repeats",
        1,
        "--lpips-weights",
        inputs["lpips"],
        "--json",
        "--quiet",
        *SIZE,
    )
    assert result.exit_code == 0, result.output
    return inf_floats(json.loads(result.stdout)), out


def rows_by_name(report):
    return {row["name"]: row for row in report["rows"]}


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_every_row_has_every_number(bench):
    report, _ = bench
    rows = rows_by_name(report)
    assert set(rows) == {
        "baseline",
        "hand.plan",
        "auto @1.25x",
        "fbc threshold=0",
        "taylorseer cache_interval=2",
        "magcache threshold=0.3",
    }
    for row in rows.values():
        assert row["status"] in ("reference", "ok", "skipped nothing"), row
        for key in ("wall_speedup", "flop_speedup", "ssim", "lpips", "bound", "wall_of_bound", "cache_bytes"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["name"], key)
        assert isinstance(row["psnr"], float) and row["psnr"] > 0
        assert row["block_calls"]["total"] == BLOCKS * STEPS * 2
    baseline = rows["baseline"]
    assert (
        baseline["psnr"] == math.inf
        and baseline["ssim"] == 1.0
        and baseline["lpips"] == 0.0
        and baseline["bound"] == 1.0
    )
    assert report["model"]["fidelity_meaningful"] and report["model"]["weights"]["files"]


def test_outputs_are_written(bench):
    report, out = bench
    assert inf_floats(json.loads((out / "bench.json").read_text())) == report
    markdown = (out / "bench.md").read_text()
    assert (
        "| method | setting | wall speedup | FLOP speedup | PSNR dB | worst dB | SSIM | LPIPS | block calls |"
        in markdown
    )
    assert all(f"| {row['method']} |" in markdown for row in report["rows"])
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert load_plan(out / "plans" / "auto-1.25x.plan").provenance["method"] == "auto"
    assert not list(out.rglob(".*.tmp"))


def test_each_method_skipped_work_or_is_flagged(bench):
    report, out = bench
    for row in report["rows"][1:]:
        calls = [row["block_calls"], *row["attention_calls"].values()]
        if row["status"] == "ok":
            assert any(c["computed"] < c["total"] for c in calls), row["name"]
        else:
            assert all(c["computed"] == c["total"] for c in calls), row["name"]
    rows = rows_by_name(report)
    assert rows["fbc threshold=0"]["status"] == "skipped nothing"
    assert "| fbc | threshold=0 | skipped nothing | skipped nothing |" in (out / "bench.md").read_text()
    assert rows["hand.plan"]["block_calls"]["computed"] == BLOCKS * STEPS * 2 - HAND_REUSED
    taylorseer = rows["taylorseer cache_interval=2"]
    assert taylorseer["hooks_installed"] == BLOCKS * 3 and taylorseer["status"] == "ok"
    assert taylorseer["block_calls"]["computed"] == BLOCKS * 3 * 2  # steps 0-2 warm-up, step 3 forecast
    assert rows["magcache threshold=0.3"]["status"] == "ok"


def test_bound_uses_block_call_fractions(bench):
    report, _ = bench
    plan = rows_by_name(report)["hand.plan"]
    fraction = plan["block_calls"]["computed"] / plan["block_calls"]["total"]
    assert plan["bound"] == pytest.approx(caching_bound(fraction, report["rho"]))
    assert 0 < report["rho"] < 0.5
    assert caching_bound(0.5, 0.0) == 2.0 and caching_bound(1.0, 0.3) == 1.0


def test_peers_are_configured_as_plain_data_and_calibrated(bench):
    report, _ = bench
    rows = rows_by_name(report)
    calibration = report["calibration"]["magcache"]
    assert len(calibration["mag_ratios"]) == STEPS and len(calibration["runs"]) == 2  # cond and uncond of one prompt
    assert rows["magcache threshold=0.3"]["setting"]["mag_ratios"] == calibration["mag_ratios"]
    assert rows["taylorseer cache_interval=2"]["setting"]["cache_identifiers"] == [r"blocks\.\d+\.(attn1|attn2|ffn)"]
    assert "batched" in report["not_applicable"]["fastercache"]
    json.dumps(report["rows"])  # every setting is plain data


def test_standing_compares_auto_with_each_peer_that_skipped_work(bench):
    report, _ = bench
    for speed in ("flop_speedup", "wall_speedup"):
        entries = report["standing"][speed]
        assert {entry["peer"] for entry in entries} == {"taylorseer", "magcache"}
        assert all(entry["ours"] == "auto @1.25x" for entry in entries)
    plan = rows_by_name(report)["auto @1.25x"]
    assert report["standing"]["flop_speedup"][0]["ours_speedup"] == plan["flop_speedup"]


def test_random_weights_are_flagged_in_the_table(bench):
    report, _ = bench
    markdown = render_markdown({**report, "model": {**report["model"], "fidelity_meaningful": False}})
    assert "meaningless" in markdown


def test_random_config_is_wan_1_3b():
    transformer = random_transformer("wan-1.3b", device="meta")
    assert len(transformer.blocks) == 30 and transformer.config.num_attention_heads == 12
    assert transformer.blocks[0].attn1.inner_dim == 1536 and transformer.config.ffn_dim == 8960
    assert (
        transformer.config.text_dim == 4096 and transformer.config.in_channels == 16 == transformer.config.out_channels
    )
    assert tuple(transformer.config.patch_size) == WAN_1_3B_CONFIG["patch_size"] == (1, 2, 2)
    assert taylorseer_identifiers(transformer) == [r"blocks\.\d+\.(attn1|attn2|ffn)"]


def test_cache_bytes_count_tensors_held_by_hooks():
    model = tiny_wan()
    assert hook_state_bytes(model) == 0
    with peer_enabled(model, {"peer": "fbc", "threshold": 0.5}) as hooked:
        run_steps(model, "wan", [999.0, 500.0, 1.0])
        assert hooked == 3 and hook_state_bytes(model) > 0
    assert hook_state_bytes(model) == 0


def test_taylorseer_defaults_hook_nothing_on_wan_and_are_refused():
    model = tiny_wan()
    with pytest.raises(BenchError, match="installed no hook"):
        with peer_enabled(model, {"peer": "taylorseer", "cache_interval": 2}):
            pass
    assert not model.is_cache_enabled
    with peer_enabled(
        model, {"peer": "taylorseer", "cache_interval": 2, "cache_identifiers": taylorseer_identifiers(model)}
    ) as hooked:
        assert hooked == 3 * 3


def test_fastercache_runs_where_cfg_is_batched():
    model = tiny_cogvideox()
    assert not_applicable("fastercache", get_adapter(model), guidance=5.0) is None
    assert "separate" in not_applicable("fastercache", get_adapter(tiny_wan()), guidance=5.0)
    timesteps = [999.0 - 120 * i for i in range(8)]
    counter = CallCounter(model)
    try:
        run_steps(model, "cogvideox", timesteps)
        full = counter.take()
        with peer_enabled(model, peer_settings("fastercache", 2, model, len(timesteps))) as hooked:
            run_steps(model, "cogvideox", timesteps)
        cached = counter.take()
    finally:
        counter.remove()
    assert hooked > 0 and cached["blocks"] < full["blocks"]


def test_every_variant_run_is_bracketed_by_baseline_runs(bench):
    base, variants = "B", list("abcde")
    assert bracketed(variants, base, every=4) == ["B", "a", "b", "c", "d", "B", "e", "B"]
    report, _ = bench
    baseline, plan = report["rows"][0], report["rows"][1]
    assert len(baseline["run_seconds"]) == 3  # 5 variants of one prompt in one round: 3 bracketing runs
    assert plan["wall_speedup"] == pytest.approx(plan["baseline_s_rounds"][0] / plan["wall_s_rounds"][0])


def test_standing_interpolates_on_peer_curves():
    rows = [
        {"name": "a", "method": "auto", "kind": "plan", "status": "ok", "wall_speedup": 2.0, "psnr": 30.0},
        {"name": "p1", "method": "peer", "kind": "peer", "status": "ok", "wall_speedup": 1.5, "psnr": 34.0},
        {"name": "p2", "method": "peer", "kind": "peer", "status": "ok", "wall_speedup": 2.5, "psnr": 26.0},
    ]
    (entry,) = standing(rows)
    assert entry["peer_speedup_at_equal_psnr"] == pytest.approx(2.0) and entry[
        "peer_psnr_at_equal_speedup"
    ] == pytest.approx(30.0)
    assert entry["dominated_by"] == [] and entry["dominates"] == []


def _row(name: str, method: str, kind: str, speed: float, psnr: float, worst: float) -> dict:
    return {
        "name": name,
        "method": method,
        "kind": kind,
        "status": "ok",
        "block_call_speedup": speed,
        "psnr": psnr,
        "psnr_min": worst,
    }


def test_matched_compares_auto_with_the_best_peer_frontier_in_log_speedup():
    rows = [
        _row("auto @1.5x", "auto", "plan", 1.5, 40.0, 36.0),
        _row("auto @3x", "auto", "plan", 3.0, 24.0, 18.0),
        _row("m1", "magcache", "peer", 1.2, 45.0, 40.0),
        _row("m2", "magcache", "peer", 3.0, 20.0, 15.0),
        _row("m3", "magcache", "peer", 2.0, 25.0, 21.0),  # beaten by m1-m2's line but not by any one point: kept
        _row("m4", "magcache", "peer", 1.9, 24.0, 30.0),  # beaten by m3 (faster and better): off the frontier
        _row("t1", "taylorseer", "peer", 1.6, 38.0, 37.0),
    ]
    assert [r["name"] for r in frontier(rows[2:6])] == ["m1", "m3", "m2"]
    at_2x = next(e for e in matched(rows) if e["speedup"] == 2.0)
    expected = 40.0 + (24.0 - 40.0) * math.log(2.0 / 1.5) / math.log(2.0)
    assert at_2x["psnr"]["auto"] == pytest.approx(expected)
    assert at_2x["psnr"]["best_peer"] == "magcache" and at_2x["psnr"]["peer"] == pytest.approx(25.0)
    assert at_2x["psnr"]["lead"] == pytest.approx(expected - 25.0)
    at_15 = next(e for e in matched(rows) if e["speedup"] == 1.5)
    assert at_15["psnr_min"]["best_peer"] == "magcache"  # taylorseer's one point (1.6x) does not reach 1.5x
    assert at_15["psnr_min"]["auto"] == pytest.approx(36.0)
    at_3x = next(e for e in matched(rows) if e["speedup"] == 3.0)
    assert at_3x["psnr"]["lead"] == pytest.approx(4.0) and at_3x["psnr_min"]["lead"] == pytest.approx(3.0)
    rows = [r for r in rows if r["name"] != "auto @3x"]
    at_3x = next(e for e in matched(rows) if e["speedup"] == 3.0)
    assert at_3x["psnr"]["auto"] is None and at_3x["psnr"]["lead"] is None  # not reached: reported, not dropped


def test_a_peer_sweep_crosses_its_grid_with_its_second_knob():
    transformer = tiny_wan(2)
    variants = peer_variants("taylorseer", (2, 4), transformer, 8, None, PEERS["taylorseer"].sweep)
    names = [v.name for v in variants]
    assert names == [
        "taylorseer cache_interval=2",
        "taylorseer cache_interval=4",
        "taylorseer cache_interval=2, disable_cache_before_step=1",
        "taylorseer cache_interval=4, disable_cache_before_step=1",
    ]
    assert [v.setting["disable_cache_before_step"] for v in variants] == [3, 3, 1, 1]
    assert all(len(PEERS[name].sweep) >= 2 for name in ("taylorseer", "magcache"))


def test_outputs_are_all_or_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_outputs(tmp_path / "out", {"a.md": b"fine", "b.json": None})
    assert not list((tmp_path / "out").iterdir())


def assert_one_line_error(result, out, *words: str) -> None:
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def test_bad_input_is_one_line_without_outputs(tmp_path, inputs):
    out = tmp_path / "out"
    garbage = tmp_path / "garbage.plan"
    garbage.write_bytes(b"\x00" * 64)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (("--plan", tmp_path / "missing.plan"), ("cannot read plan file",)),
        (("--plan", garbage), ("not a dit-plan file",)),
        (("--fit",), ("--fit needs a profile",)),
        (("--profile", tmp_path / "missing.h5"), ("missing.h5",)),
        (("--thresholds", "nosuch=1"), ("PEER=",)),
        (("--thresholds", "fbc=abc"), ("comma-separated numbers",)),
        (("--thresholds", "taylorseer=1.5"), ("integers",)),
        (("--peers", "fbc", "--thresholds", "magcache=0.1"), ("leaves out",)),
        (("--peers", "fbc,nosuch"), ("unknown peer",)),
        (("--model", tmp_path, "--random-config", "wan-1.3b"), ("not both",)),
        (("--random-config", "wan-14b"), ("wan-14b",)),
        (("--prompts", empty), ("holds no prompt",)),
        (("--steps", "1"), ("--steps",)),
        (("--lpips-weights", tmp_path / "missing.pt"), ("does not exist",)),
        (("--lpips-weights", garbage), ("cannot load LPIPS weights",)),
        (("--device", "cuda:0"), ("cuda",)),
        (("--budgets", "1.0"), ("above 1",)),
        (("--presets", "teacache"), ("unknown preset",)),
    ]
    for args, words in cases:
        assert_one_line_error(run("--out", out, "--quiet", *args), out, *words)
    assert_one_line_error(run("--out", a_file / "sub", "--quiet"), a_file / "sub", "not a folder")


def test_bad_input_found_after_loading_the_model(tmp_path, inputs):
    out = tmp_path / "out"
    other = tmp_path / "other.plan"
    save_plan(Plan.all_compute(fingerprint_model(tiny_wan()), timesteps=np.linspace(999.0, 0.0, STEPS)), other)
    unknown_words = tmp_path / "prompts.txt"
    unknown_words.write_text("a dragon flies over the sea\n")
    common = ("--out", out, "--quiet", "--peers", "fbc", "--steps", 2, *SIZE)
    assert_one_line_error(run(*common, "--plan", other), out, "other.plan", "config_hash")
    assert_one_line_error(run(*common, "--prompts", unknown_words), out, "refused prompt", "unknown word")


def test_seacache_reads_the_noisy_latent_of_a_wan_with_conditioning_channels():
    """Without the callback diffusers' SeaCache fails open on the default model (15 input channels, 12 noisy)."""
    from dit_accel.defaultmodel import load_default_pipeline

    pipe = load_default_pipeline()
    transformer = pipe.transformer
    settings = peer_settings("seacache", 100.0, transformer, steps=6)
    assert settings["noisy_channels"] == transformer.config.out_channels < transformer.config.in_channels
    json.dumps(settings)
    counter = CallCounter(transformer)

    def blocks_computed(peer: dict) -> int:
        counter.take()
        with peer_enabled(transformer, peer):
            pipe(prompt=PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np")
        return counter.take()["blocks"]

    fails_open = blocks_computed({k: v for k, v in settings.items() if k != "noisy_channels"})
    skipping = blocks_computed(settings)
    assert fails_open == 6 * 2 * BLOCKS and skipping < fails_open


def test_noisy_latent_reader_drops_the_conditioning_channels():
    from dit_accel.bench.peers import noisy_latent_reader

    hidden = torch.arange(2 * 15 * 8, dtype=torch.float32).reshape(2, 15, 2, 2, 2)
    read = noisy_latent_reader(12)
    items = read(None, (), {"hidden_states": hidden})
    assert len(items) == 2 and all(torch.equal(item, hidden[i, :12]) for i, item in enumerate(items))
    assert read(None, (hidden[0, 0],), {}) is None  # not a 5-D video latent: SeaCache fails open as diffusers does


def test_row_psnr_pools_the_mse_so_one_untouched_prompt_does_not_make_it_infinite():
    from dit_accel.bench.runner import _pooled_fidelity

    pooled = _pooled_fidelity([{"psnr": math.inf, "ssim": 1.0}, {"psnr": 20.0, "ssim": 0.5}])
    assert pooled["psnr"] == pytest.approx(20.0 + 10 * math.log10(2)) and pooled["psnr_min"] == 20.0
    assert pooled["ssim"] == 0.75 and pooled["lpips"] is None
    assert _pooled_fidelity([{"psnr": math.inf, "ssim": 1.0}])["psnr"] == math.inf


def test_spearman_ranks_ties_and_ignores_monotone_rescaling():
    from dit_accel.bench.rank_correlation import spearman

    x = np.array([0.1, 0.4, 0.2, 0.9, 0.3])
    assert spearman(x, np.exp(5 * x)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 25.0])) == pytest.approx(0.8)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([3.0, 3.0, 1.0])) == pytest.approx(-1.0)
