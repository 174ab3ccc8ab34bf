"""Atomic writers (harness/files.py): the destination is the old content or the complete new one, never less."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dit_accel.harness import files
from dit_accel.harness.files import atomic_path, replace_folder, staging_folder, write_bytes_atomic, write_files_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "plan.plan"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.plan"]


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "a.bin", b"x")
        write_files_atomic(tmp_path / "report", {"bench.json": b"{}", "sub/bench.md": b"#"})
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "a.bin") == 0o644
    assert (
        _mode(tmp_path / "report" / "bench.json") == 0o644 and _mode(tmp_path / "report" / "sub" / "bench.md") == 0o644
    )


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_replace_folder_swaps_in_the_new_folder_and_removes_the_old(
    tmp_path: Path, monkeypatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    destination = tmp_path / "export"
    destination.mkdir()
    (destination / "old.onnx").write_bytes(b"old")
    staged = staging_folder(destination)
    (staged / "new.onnx").write_bytes(b"new")
    replace_folder(staged, destination)
    assert [p.name for p in destination.iterdir()] == ["new.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_the_old_folder_survives_until_the_new_one_is_in_place(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    destination = tmp_path / "export"
    destination.mkdir()
    (destination / "old.onnx").write_bytes(b"old")
    staged = staging_folder(destination)
    real_replace = os.replace

    def crash_after_moving_the_old_aside(src, dst):
        real_replace(src, dst)
        if Path(src) == destination:
            raise KeyboardInterrupt("killed between the two renames")

    monkeypatch.setattr(files.os, "replace", crash_after_moving_the_old_aside)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(staged, destination)
    survivors = [p for p in tmp_path.rglob("old.onnx")]
    assert len(survivors) == 1 and survivors[0].read_bytes() == b"old"
