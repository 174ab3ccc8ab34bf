"""The analysis notebooks run top to bottom, headless, on a small profile of the default model."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["inspect_profile.ipynb", "plan_tradeoffs.ipynb"]


@pytest.fixture(scope="module")
def shared_profile(tmp_path_factory) -> Path:
    """One small profile for both notebooks: the first to run makes it, the second reuses it."""
    return tmp_path_factory.mktemp("notebooks") / "small_profile.h5"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_cell_errors_and_draws(name, shared_profile, monkeypatch):
    monkeypatch.setenv("DIT_NOTEBOOK_PROFILE", str(shared_profile))
    monkeypatch.setenv("DIT_NOTEBOOK_STEPS", "12")
    monkeypatch.setenv("DIT_REPO", str(REPO))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # one torch thread in the kernel: on a loaded 2-core machine, OpenMP threads of a kernel process that wait for
    # a descheduled peer made a 12-step generation 40x slower (measured 49.9 s vs 1.2 s)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    plotting = [
        cell
        for cell in notebook.cells
        if cell.cell_type == "code" and "figure" in cell.source.strip().splitlines()[-1].lower()
    ]
    assert len(plotting) >= 3
    for cell in plotting:  # every cell that ends on a figure displayed it as an image
        assert any("image/png" in output.get("data", {}) for output in cell.outputs), cell.source
    assert shared_profile.exists()
