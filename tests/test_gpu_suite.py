"""The one-call GPU suite: its smoke size runs every row end to end on the CPU, failures stay one line, and the
cache memory `dit-plan inspect` predicts is what the runtime holds."""

from __future__ import annotations

import pytest
import torch

from dit_accel.bench import gpu_suite
from dit_accel.planner.summary import cache_memory, plan_report, render_report
from dit_accel.runtime import apply_plan


def test_smoke_runs_every_row_on_the_cpu(tmp_path):
    out = tmp_path / "benchmarks.md"
    rows = gpu_suite.main(["--smoke", "--out", str(out)])
    assert [r for r in rows if r.measurement == "failed"] == []
    names = {r.name.split()[0] for r in rows}
    assert names == set(gpu_suite.ROWS)
    assert [r.name for r in rows if r.name.startswith("plans")] == ["plans 1.5x", "plans 2.0x", "plans 2.5x"]
    by_name = {r.name: r for r in rows}
    measured, predicted = by_name["cache_memory"].result.split(" (")
    assert measured == predicted.rstrip(")")
    assert "full FLASH_ATTENTION, pruned MATH" in by_name["pruned_attention"].note
    text = out.read_text()
    assert (
        text.count("\n| ") == len(rows) + 1
        and "needs a GPU" in text
        and not (tmp_path / "benchmarks.md.partial").exists()
    )


def test_a_failing_row_is_one_line_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(_suite):
        raise RuntimeError("out of memory\nwith a long traceback")

    monkeypatch.setitem(gpu_suite.ROW_FUNCTIONS, "overhead", broken)
    out = tmp_path / "b.md"
    rows = gpu_suite.main(["--smoke", "--rows", "overhead,cache_memory", "--out", str(out)])
    assert [(r.name, r.measurement, r.result) for r in rows[:1]] == [
        ("overhead", "failed", "RuntimeError: out of memory")
    ]
    assert rows[1].name == "cache_memory" and rows[1].measurement != "failed"
    assert "| overhead | failed | RuntimeError: out of memory |" in out.read_text()


@pytest.mark.parametrize(
    "args, words", [(["--rows", "overhead,nope"], "nope"), (["--out", "missing/dir/b.md"], "does not exist")]
)
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main(["--smoke", *args])
    assert exit_info.value.code != 0 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("speedup", [2.0, 1.5])
def test_inspect_predicts_the_cache_bytes_the_runtime_holds(speedup):
    suite = gpu_suite.Suite(gpu_suite.SMOKE, torch.device("cpu"), torch.float32)
    plan = suite.reuse_plan(speedup)
    with apply_plan(suite.transformer, plan) as handle:
        suite.denoise()
        measured = handle.cache_bytes()
    predicted = cache_memory(plan, None, None, dtype_bytes=4)
    assert set(measured) == {"cond", "uncond"} and predicted["branches"] == 2
    assert predicted["bytes"] == sum(measured.values()) > 0
    assert predicted["spans"] == [{"span": [0, suite.blocks], "tensors": 1, "bytes_per_branch": measured["cond"]}]
    extrapolating = plan.with_changes(policy={"kind": "static", "reuse": "extrapolate"})
    assert cache_memory(extrapolating, None, None, 4)["bytes"] == 2 * predicted["bytes"]


def test_inspect_says_unknown_without_a_token_count():
    suite = gpu_suite.Suite(gpu_suite.SMOKE, torch.device("cpu"), torch.float32)
    plan = suite.reuse_plan(2.0).with_changes(provenance={})
    report = plan_report(plan)
    assert report["cache_memory"]["bytes"] is None and "tokens, hidden, branches" in report["cache_memory"]["unknown"]
    assert "bytes unknown" in render_report(report)
    given = plan_report(plan.with_changes(provenance={"profile_settings": {"guidance_scale": 5.0}}), 100, 64)
    assert given["cache_memory"]["bytes"] == 100 * 64 * 2 * 2
    assert "= 25.0 KiB" in render_report(given)
