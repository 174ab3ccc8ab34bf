"""dit-plan command line: fit / inspect outputs, and bad input as one error line, exit code != 0, no file left."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dit_accel.planner.cli import main
from dit_accel.planner.synthetic import SyntheticSpec, write_synthetic_profile
from dit_accel.runtime import load_plan

STEPS, BLOCKS = 12, 4


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> str:
    return write_synthetic_profile(tmp_path_factory.mktemp("cli") / "synthetic.h5")


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, output, *words: str) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*")), "a temporary file was left behind"


def test_fit_writes_a_plan_and_reports_json(profile, tmp_path):
    out = tmp_path / "m.plan"
    result = run("fit", profile, "-o", out, "--method", "unicp", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plan = load_plan(out)
    assert report["output"] == str(out) and report["policy"] == plan.policy and report["predicted"] == plan.predicted


def test_fit_twice_gives_identical_files(profile, tmp_path):
    first, second = tmp_path / "a.plan", tmp_path / "b.plan"
    for out in (first, second):
        assert run("fit", profile, "-o", out, "--target-speedup", "1.8").exit_code == 0
    assert first.read_bytes() == second.read_bytes()


def test_fit_refuses_profiles_of_different_models(profile, tmp_path):
    other = write_synthetic_profile(
        tmp_path / "other.h5", SyntheticSpec(transformer_class="CogVideoXTransformer3DModel")
    )
    out = tmp_path / "m.plan"
    assert_one_line_error(run("fit", profile, other, "-o", out), out, "different models")


def test_fit_bad_inputs_are_one_line_errors_without_output(profile, tmp_path):
    out = tmp_path / "m.plan"
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all")
    truncated = tmp_path / "truncated.h5"
    data = open(profile, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    no_attention = write_synthetic_profile(tmp_path / "no_attention.h5", SyntheticSpec(omit=("attention_received",)))
    cases = [
        (("fit", tmp_path / "missing.h5", "-o", out), ("missing.h5", "does not exist")),
        (("fit", garbage, "-o", out), ("garbage.h5",)),
        (("fit", truncated, "-o", out), ("truncated.h5",)),
        (("fit", no_attention, "-o", out, "--method", "profilingdit"), ("attention_received",)),
        (("fit", profile, "-o", out, "--target-speedup", "40"), ("impossible",)),
        (("fit", profile, "-o", out, "--target-speedup", "2", "--max-error", "0.1"), ("not both",)),
        (("fit", profile, "-o", out, "--target-speedup", "fast"), ("target-speedup",)),
        (("fit", profile, "-o", out, "--pca-variance", "1.5", "--method", "unicp"), ("pca-variance",)),
        (("fit", profile, "-o", out, "--method", "magic"), ("magic",)),
        (("fit", profile, "-o", out, "--front-blocks", "1"), ("--front-blocks needs", "measured reuse costs")),
        (("fit", profile, "-o", out, "--front-blocks", "-1"), ("front-blocks",)),
        (("fit", "-o", out), ("PROFILES",)),
    ]
    for args, words in cases:
        assert_one_line_error(run(*args), out, *words)


def test_inspect_json_describes_the_plan(profile, tmp_path):
    out = tmp_path / "m.plan"
    assert run("fit", profile, "-o", out, "--method", "unicp").exit_code == 0
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plan = load_plan(out)
    assert (
        report["num_inference_steps"] == STEPS
        and report["policy"] == {"kind": "static"}
        and report["method"] == "unicp"
    )
    assert report["predicted"] == plan.predicted and report["compute_fraction"] == pytest.approx(
        plan.compute_fraction()
    )
    assert [b["label"] for b in report["blocks"]] == list(plan.labels)
    for block, row in zip(report["blocks"], plan.actions):
        assert block["schedule"] == "".join("C.P"[a] for a in row)
        assert block["computed"] + block["reused"] + block["pruned"] == STEPS and block["pca_rank"] == 2
    assert report["spans"] == [list(s) for s in plan.spans]
    assert report["provenance"]["profiles"][0]["sha256"] == plan.provenance["profiles"][0]["sha256"]
    assert report["arrays"]["dws_weight"] == [BLOCKS, STEPS]


def test_inspect_text_and_plot(profile, tmp_path):
    out, figure = tmp_path / "m.plan", tmp_path / "fig.png"
    assert run("fit", profile, "-o", out, "--method", "adacache").exit_code == 0
    result = run("inspect", out, "--plot", figure)
    assert result.exit_code == 0, result.output
    assert "policy: adacache" in result.stdout and "blocks.0 F" in result.stdout and "expected compute" in result.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "skipped" not in result.stdout


def test_fit_says_how_far_an_adaptive_plans_speedup_ranges_over_the_calibration_prompts(profile, tmp_path):
    out = tmp_path / "a.plan"
    result = run("fit", profile, "-o", out, "--method", "adacache")
    low, high = load_plan(out).predicted["step_speedup_range"]
    assert result.exit_code == 0 and f"ranged {low:.2f}x to {high:.2f}x on the" in result.stdout
    static = run("fit", profile, "-o", tmp_path / "s.plan", "--method", "auto")
    assert static.exit_code == 0 and "ranged" not in static.stdout


def test_inspect_plot_skips_the_drift_heatmap_when_the_profile_is_gone(tmp_path):
    profile = write_synthetic_profile(tmp_path / "gone.h5")
    out, figure = tmp_path / "m.plan", tmp_path / "fig.png"
    assert run("fit", profile, "-o", out).exit_code == 0
    (tmp_path / "gone.h5").unlink()
    result = run("inspect", out, "--plot", figure, "--json")
    assert (
        result.exit_code == 0 and "drift heatmap skipped" in json.loads(result.stdout)["plot_note"] and figure.exists()
    )


def test_inspect_bad_plan_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x00" * 64)
    result = run("inspect", bad)
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1


def test_validate_bad_inputs_are_one_line_errors_before_loading_a_model(profile, tmp_path):
    plan, out = tmp_path / "m.plan", tmp_path / "tight.plan"
    assert run("fit", profile, "-o", plan).exit_code == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left on a black background\n")
    cases = [
        (("validate", plan, "--prompts", tmp_path / "none.txt", "--min-psnr", "30", "-o", out), ("none.txt",)),
        (("validate", plan, "--prompts", empty, "--min-psnr", "30", "-o", out), ("no prompt",)),
        (("validate", plan, "--prompts", binary, "--min-psnr", "30", "-o", out), ("UTF-8",)),
        (("validate", plan, "--prompts", prompts, "--min-psnr", "30"), ("-o",)),
        (
            ("validate", tmp_path / "nothing.plan", "--prompts", prompts, "--min-psnr", "30", "-o", out),
            ("nothing.plan",),
        ),
        (
            ("validate", plan, "--prompts", prompts, "--model", tmp_path, "--min-psnr", "30", "-o", out),
            ("pipeline folder",),
        ),
    ]
    for args, words in cases:
        assert_one_line_error(run(*args), out, *words)


def test_output_in_a_missing_folder_is_refused_before_reading_the_profiles(tmp_path):
    out = tmp_path / "missing" / "dir" / "m.plan"
    result = run("fit", tmp_path / "not-read.h5", "-o", out)
    assert_one_line_error(result, out, f"output folder {out.parent} does not exist")
    assert not (tmp_path / "missing").exists()


def test_plot_with_an_unknown_extension_is_refused_before_reading_the_plan(tmp_path):
    figure = tmp_path / "figure.xyz"
    result = run("inspect", tmp_path / "not-read.plan", "--plot", figure)
    assert_one_line_error(result, figure, ".xyz", "png", "svg")
    assert "not-read.plan" not in result.stderr


def test_validate_output_in_a_missing_folder_is_refused_before_loading_a_model(profile, tmp_path):
    plan, out = tmp_path / "m.plan", tmp_path / "missing" / "tight.plan"
    assert run("fit", profile, "-o", plan).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left on a black background\n")
    result = run("validate", plan, "--prompts", prompts, "--min-psnr", "30", "-o", out, "--model", tmp_path)
    assert_one_line_error(result, out, "does not exist", str(out.parent))
