"""The rooms of docs/architecture.md, enforced: who may import whom, what installs, what stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("harness", "runtime", "profiler", "planner", "export", "bench", "defaultmodel")

#: room (or room.module) → project modules it may import; the most specific key applies.
ALLOWED: dict[str, tuple[str, ...]] = {
    "harness": ("harness",),
    "harness.pipelines": ("harness", "runtime.adapters", "defaultmodel"),
    "runtime": ("runtime", "harness.errors", "harness.files"),
    "profiler": ("profiler", "harness", "runtime", "defaultmodel"),
    "planner": ("planner", "harness", "runtime", "profiler", "export"),
    "export": ("export", "harness", "runtime"),
    "export.driver": ("export.manifest", "harness.errors"),
    "export.manifest": ("harness.errors",),
    "bench": ROOMS,
    "defaultmodel": ("defaultmodel", "harness.files"),
}


def _modules() -> list[tuple[str, Path]]:
    return [
        (f"{room}.{path.stem}" if path.stem != "__init__" else room, path)
        for room in ROOMS
        for path in sorted((ROOT / room).glob("*.py"))
    ]


def _project_imports(module: str, path: Path) -> set[str]:
    """Project modules `module` imports, as `room.module` names (relative imports resolved)."""
    found: set[str] = set()
    room = module.split(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names = [f"dit_accel.{room}.{node.module}" if node.module else f"dit_accel.{room}"]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in ROOMS:
                found.add(f"top-level {parts[0]}")
            elif parts[0] == "dit_accel" and len(parts) > 1:
                found.add(".".join(parts[1:3]))
    return found


def _allowed(module: str, target: str) -> bool:
    rule = ALLOWED.get(module) or ALLOWED[module.split(".")[0]]
    return any(target == allowed or target.startswith(allowed + ".") for allowed in rule)


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_imports_follow_the_rooms_rules(module: str, path: Path) -> None:
    forbidden = sorted(
        t for t in _project_imports(module, path) if t.startswith("top-level") or not _allowed(module, t)
    )
    assert not forbidden, f"{module} imports {forbidden}, which docs/architecture.md does not allow"


def test_every_room_installs_under_the_dit_accel_namespace() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(config["package-dir"].values()) == folders == set(ROOMS)
    assert sorted(config["packages"]) == sorted(f"dit_accel.{room}" for room in ROOMS)
    assert all(config["package-dir"][f"dit_accel.{room}"] == room for room in ROOMS)
    assert not list(ROOT.glob("*/*/__init__.py")), "a nested package must be listed in pyproject.toml too"


def _run_outside_the_checkout(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_installed_names_live_only_under_dit_accel(tmp_path: Path) -> None:
    for room in ("runtime", "profiler", "planner", "defaultmodel"):
        result = _run_outside_the_checkout(f"import {room}", tmp_path)
        assert result.returncode != 0 and "No module named" in result.stderr, room
    result = _run_outside_the_checkout("from dit_accel.runtime import apply_plan, load_plan; print('ok')", tmp_path)
    assert result.stdout.strip() == "ok", result.stderr


def test_export_driver_imports_and_reads_manifests_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch is not installed here')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from dit_accel.export.driver import OnnxPlanRunner\n"
        "from dit_accel.export.manifest import ExportError\n"
        "try:\n"
        "    OnnxPlanRunner('.')\n"
        "except ExportError as exc:\n"
        "    print('refused:', exc)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    result = _run_outside_the_checkout(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "manifest.json not found" in result.stdout
    assert result.stdout.strip().endswith("[]")
