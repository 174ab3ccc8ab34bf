"""What every command shares: one spelling of the pipeline options, `-h`, a torch-free `--help`, prompts checked before
any work, `-o` folders checked first, and the shipped plans found wherever the package is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from dit_accel.bench import cli as bench_cli
from dit_accel.bench import demo as bench_demo
from dit_accel.export.exporter import check_export_destination
from dit_accel.export.manifest import ExportError
from dit_accel.harness import checks, cli
from dit_accel.harness.errors import DitAccelError
from dit_accel.harness.prompts import PromptSpec
from dit_accel.harness.shipped import shipped_plan, shipped_plans
from dit_accel.planner import cli as planner_cli
from dit_accel.profiler import cli as profiler_cli

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("--model", "--device", "--dtype", "--steps", "--guidance", "--frames", "--height", "--width")
#: command → the shared pipeline options it takes (the rest do not apply: see each command's --help).
PIPELINE_COMMANDS = {
    ("dit-profile", "run"): SHARED + ("--prompts",),
    ("dit-plan", "validate"): SHARED + ("--prompts",),
    ("dit-plan", "export-onnx"): ("--model", "--device", "--dtype", "--frames", "--height", "--width"),
    ("dit-plan", "fit"): ("--model", "--device", "--dtype"),
    ("dit-bench", None): SHARED + ("--prompts",),
    ("dit-demo", None): ("--device", "--dtype", "--steps"),
}
MAINS = {
    "dit-profile": profiler_cli.main,
    "dit-plan": planner_cli.main,
    "dit-bench": bench_cli.main,
    "dit-demo": bench_demo.main,
}
CLI_MODULES = {
    "dit-profile": "dit_accel.profiler.cli",
    "dit-plan": "dit_accel.planner.cli",
    "dit-bench": "dit_accel.bench.cli",
    "dit-demo": "dit_accel.bench.demo",
}


def _command(name: str, sub: str | None) -> click.Command:
    main = MAINS[name]
    return main.commands[sub] if sub else main


def _options(command: click.Command) -> dict[str, click.Option]:
    return {opt: param for param in command.params if isinstance(param, click.Option) for opt in param.opts}


@pytest.mark.parametrize(("name", "sub"), list(PIPELINE_COMMANDS), ids=[f"{n} {s or ''}" for n, s in PIPELINE_COMMANDS])
def test_pipeline_commands_spell_the_shared_options_the_same_way(name, sub):
    options = _options(_command(name, sub))
    reference = _options(_command("dit-plan", "validate"))
    for flag in PIPELINE_COMMANDS[name, sub]:
        assert flag in options, f"{name} {sub or ''} lacks {flag}"
        mine, theirs = options[flag], reference[flag]
        assert (mine.name, mine.type.name, mine.multiple) == (theirs.name, theirs.type.name, theirs.multiple), flag
    assert "--guidance-scale" not in options and "--model-path" not in options


def test_defaults_taken_from_a_plan_or_profile_say_so_in_help():
    validate = _options(_command("dit-plan", "validate"))
    assert "plan's" in validate["--steps"].help and "profile's" in validate["--guidance"].help
    bench = _options(_command("dit-bench", None))
    assert "profile's" in bench["--steps"].help and "profile's" in bench["--guidance"].help


def _every_command() -> list[tuple[str, list[str]]]:
    found = []
    for name, main in MAINS.items():
        found.append((name, []))
        for sub in getattr(main, "commands", {}):
            found.append((name, [sub]))
    return found


@pytest.mark.parametrize(("name", "path"), _every_command(), ids=[" ".join([n, *p]) for n, p in _every_command()])
def test_dash_h_is_help_on_every_group_and_command(name, path):
    result = CliRunner().invoke(MAINS[name], [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:") and "-h, --help" in result.output


def test_mirrored_choices_agree_with_the_library():
    from dit_accel.bench.models import RANDOM_CONFIGS
    from dit_accel.bench.peers import PEERS
    from dit_accel.bench.runner import DEFAULT_BUDGETS
    from dit_accel.bench.variants import FIT_PRESETS
    from dit_accel.harness.pipelines import DTYPES
    from dit_accel.planner.labels import RULES
    from dit_accel.planner.methods import METHODS
    from dit_accel.planner.solver import GRANULARITIES
    from dit_accel.runtime.replay_table import REUSE_MODES

    assert cli.DTYPE_NAMES == tuple(DTYPES)
    assert planner_cli.METHOD_NAMES == METHODS and planner_cli.LABEL_RULES == RULES
    assert planner_cli.GRANULARITY_NAMES == GRANULARITIES and planner_cli.REUSE_MODE_NAMES == REUSE_MODES
    assert bench_cli.PEER_NAMES == tuple(PEERS) and bench_cli.RANDOM_CONFIG_NAMES == tuple(sorted(RANDOM_CONFIGS))
    assert bench_cli.FIT_PRESET_NAMES == FIT_PRESETS and bench_cli.DEFAULT_BUDGET_VALUES == DEFAULT_BUDGETS


def test_lazy_packages_resolve_every_public_name():
    import dit_accel.bench
    import dit_accel.planner

    for package in (dit_accel.planner, dit_accel.bench):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        with pytest.raises(AttributeError):
            package.no_such_name  # noqa: B018
    assert dit_accel.planner.__version__ == dit_accel.planner.PLANNER_VERSION


_NO_TORCH_HELP = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch': raise ImportError('torch imported by --help')
sys.meta_path.insert(0, NoTorch())
import importlib
main = importlib.import_module(sys.argv[1]).main
try:
    main(['--help'])
except SystemExit as exc:
    assert not exc.code, exc.code
print('torch' in sys.modules)
"""


@pytest.mark.parametrize("name", list(CLI_MODULES))
def test_help_imports_no_torch(name, tmp_path):
    """Each command's --help in a fresh interpreter where importing torch raises (so it fails if --help needs it)."""
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_HELP, CLI_MODULES[name]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and result.stdout.strip().endswith("\nFalse"), result.stdout


# -- prompts checked before any work --------------------------------------------------------------------------------


class _FakePipe:
    """Just what `check_prompts` reads: the pipeline's components, with the default model's tokenizer."""

    def __init__(self) -> None:
        from dit_accel.defaultmodel import WordTokenizer

        self.components = {"tokenizer": WordTokenizer.from_package(), "transformer": None}


def test_unknown_word_is_one_line_naming_the_prompt_and_the_words():
    specs = [PromptSpec("a large red circle moves right on a teal background"), PromptSpec("a cat on a sofa")]
    with pytest.raises(DitAccelError) as caught:
        checks.check_prompts(_FakePipe(), specs, "held-out.txt")
    message = str(caught.value)
    assert "\n" not in message and "prompt 2 of held-out.txt" in message and "'cat'" in message and "'sofa'" in message
    assert "shapes: circle, square, triangle" in message
    checks.check_prompts(_FakePipe(), specs[:1])  # a caption of the grammar passes


def test_negative_prompts_are_checked_too():
    with pytest.raises(DitAccelError, match="negative prompt 1 of p.jsonl"):
        checks.check_prompts(_FakePipe(), [PromptSpec("a small red square moves up", "blurry")], "p.jsonl")


def test_dit_profile_checks_every_prompt_before_profiling_the_first(tmp_path, monkeypatch):
    import dit_accel.harness.pipelines as pipelines
    import dit_accel.profiler.run as run

    profiled = []
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *args, **kwargs: _FakePipe())
    monkeypatch.setattr(run, "profile_distributed", lambda *args, **kwargs: profiled.append(args))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle moves right on a teal background\n" * 3 + "a purple dragon flies\n")
    result = CliRunner().invoke(profiler_cli.main, ["--prompts", str(prompts), "-o", str(tmp_path / "x.h5"), "--quiet"])
    assert result.exit_code == 2 and profiled == []
    assert result.stderr.count("\n") == 1 and "prompt 4 of" in result.stderr and "'dragon'" in result.stderr


def test_dit_bench_checks_prompts_before_loading_the_default_model(tmp_path, monkeypatch):
    import dit_accel.bench.runner as runner

    monkeypatch.setattr(runner, "run_bench", lambda options: pytest.fail("ran the bench"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small blue square moves down on a gray background\na unicorn\n")
    result = CliRunner().invoke(bench_cli.main, ["--out", str(tmp_path / "out"), "--prompts", str(prompts), "--quiet"])
    assert result.exit_code == 2 and "refused prompt 2" in result.stderr and "'unicorn'" in result.stderr


# -- files the commands write ---------------------------------------------------------------------------------------


def test_output_file_in_a_missing_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(DitAccelError, match=re.escape(f"output folder {tmp_path / 'missing' / 'dir'} does not exist")):
        checks.check_output_file(tmp_path / "missing" / "dir" / "x.plan")
    with pytest.raises(DitAccelError, match="is a folder"):
        checks.check_output_file(tmp_path)
    assert checks.check_output_file(tmp_path / "x.plan") == tmp_path / "x.plan"
    assert not (tmp_path / "missing").exists()


def test_image_extension_is_checked_against_what_matplotlib_writes(tmp_path):
    with pytest.raises(DitAccelError) as caught:
        checks.check_image_file(tmp_path / "figure.xyz")
    message = str(caught.value)
    assert ".xyz" in message and "png" in message and "svg" in message and "\n" not in message
    for name in ("figure.png", "figure.PDF", "figure.svg"):
        assert checks.check_image_file(tmp_path / name) == tmp_path / name
    assert "png" in checks.image_extensions()


def test_export_force_replaces_a_foreign_folder_but_never_the_cwd_or_the_plans_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(ExportError, match="--force"):
        check_export_destination(photos)
    assert check_export_destination(photos, replace=True) == photos
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "m.plan").write_bytes(b"plan")
    for destination in (".", tmp_path.parent):
        with pytest.raises(ExportError, match="current folder"):
            check_export_destination(destination, replace=True)
    for destination in (plans, plans / "m.plan"):
        with pytest.raises(ExportError, match="holds the input"):
            check_export_destination(destination, inputs=[plans / "m.plan"], replace=True)
    with pytest.raises(ExportError, match="not a folder"):
        check_export_destination(photos / "cat.jpg", replace=True)
    assert (photos / "cat.jpg").exists() and (plans / "m.plan").exists()


def test_export_cli_refuses_the_plans_folder_with_force_before_loading_anything(tmp_path, monkeypatch):
    import dit_accel.harness.pipelines as pipelines

    monkeypatch.setattr(pipelines, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded a pipeline"))
    plan = tmp_path / "plans" / "m.plan"
    plan.parent.mkdir()
    shutil.copy(shipped_plan("default-auto-2x"), plan)
    result = CliRunner().invoke(planner_cli.main, ["export-onnx", str(plan), "-o", str(plan.parent), "--force"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "holds the input" in result.stderr
    assert plan.exists()


# -- shipped plans --------------------------------------------------------------------------------------------------


def test_shipped_plans_are_found_by_name():
    names = {p.stem for p in shipped_plans()}
    assert {"default-auto-2x", "default-unicp-2x"} <= names
    assert shipped_plan("default-auto-2x") == shipped_plan("default-auto-2x.plan")
    with pytest.raises(DitAccelError, match="shipped: default-adacache-2x"):
        shipped_plan("nope")


@pytest.mark.slow  # builds a wheel
def test_wheel_ships_the_plans_where_the_locator_looks(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "tests"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".", "-w", tmp_path / "wheel"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dit_accel/harness/shipped.py" in names  # the locator looks one level above its folder: dit_accel/plans/
    assert {f"dit_accel/plans/{p.name}" for p in shipped_plans()} <= names
    requires = [line for line in _metadata(wheel).splitlines() if line.startswith("Requires-Dist: onnxscript")]
    assert requires and "extra ==" not in requires[0], "export-onnx needs onnxscript without the test extra"


def _metadata(wheel: Path) -> str:
    archive = zipfile.ZipFile(wheel)
    (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return archive.read(name).decode()


# -- the README's Python snippet ------------------------------------------------------------------------------------


@pytest.mark.slow  # the default model, 50 steps with a plan
def test_readme_python_snippet_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (snippet,) = [b for b in blocks if "apply_plan" in b]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["video"].shape[-1] == 3 and namespace["plan"].provenance["method"] == "auto"


# -- long phases show progress --------------------------------------------------------------------------------------


@pytest.mark.slow  # the default model
def test_step_sensitivity_has_its_own_progress(monkeypatch):
    import tqdm.auto

    from dit_accel.harness.pipelines import load_pipeline
    from dit_accel.profiler.recorder import RecordSettings
    from dit_accel.profiler.sensitivity import measure_sensitivity

    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def close(self) -> None:
            bars.append((getattr(self, "desc", None), self.n, getattr(self, "total", None), self.disable))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    pipe = load_pipeline(None)
    settings = RecordSettings(num_inference_steps=4, sensitivity_steps=2, guidance_scale=1.0)
    spec = PromptSpec("a large red circle moves right on a teal background", "", 0)
    result = measure_sensitivity(pipe, spec, settings, {}, True)
    ((_, done, total, _),) = [bar for bar in bars if bar[0] == "step sensitivity" and not bar[3]]
    assert done == total > 0 and total % 3 == 0  # a reference and two measured steps, as many transformer calls each
    assert (~np.isnan(result)).sum() == 2
    bars.clear()
    measure_sensitivity(pipe, spec, settings, {}, False)
    assert not [bar for bar in bars if bar[0] == "step sensitivity"], "progress=False disables the bar"


def test_phase_lines_go_to_stderr_unless_quiet(capsys):
    cli.say("2/5 fitting", quiet=False)
    cli.say("3/5 hidden", quiet=True)
    captured = capsys.readouterr()
    assert captured.err == "2/5 fitting\n" and captured.out == ""


def test_demo_summary_ends_with_every_file_written():
    written = ["o/auto.plan", "o/profile.h5", "o/full.gif", "o/accelerated.gif", "o/report.json"]
    report = {
        "plan": "o/auto.plan",
        "target_speedup": 2.0,
        "steps": 8,
        "repeats": 1,
        "wall_speedup": 1.5,
        "flop_speedup": 1.9,
        "predicted_speedup": 2.0,
        "prompts": [{"prompt": "p", "psnr": 30.0, "ssim": 0.9}],
        "held_out_latent_error": 0.01,
        "predicted_error": 0.01,
        "warning": None,
        "written": written,
    }
    assert bench_demo.render(report).splitlines()[-1] == "wrote " + ", ".join(written)
