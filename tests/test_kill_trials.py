"""SIGKILL trials of the writers other than the profile's (its own are in test_profile_file.py / test_reliability.py):
`dit-plan fit` (a plan file), bench reports (several files), ONNX exports (a folder swapped in whole).

Each trial kills the writer at a random moment, the rename included, over an earlier complete output, and checks
that the destination is the earlier output or the complete new one: never missing, never partial, never a mix inside
one file (nor, for a folder, a mix of files from two versions).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

from dit_accel.harness.files import replace_folder, staging_folder, write_files_atomic
from dit_accel.planner.synthetic import write_synthetic_profile

KILL_TRIALS = 10


def _versions(size: int) -> list[dict[str, bytes]]:
    """Two versions of a set of files, each file's bytes naming its version so a mix or a tear shows."""
    return [{f"f{i}.bin": bytes([v]) * size for i in range(4)} for v in (1, 2)]


def _kill_after(target, args: tuple, delay: float) -> None:
    """Run `target(*args)` in a forked child and SIGKILL it after `delay` seconds (if it is still running)."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    time.sleep(delay)
    if child.is_alive():
        os.kill(child.pid, signal.SIGKILL)
    child.join()


def _rewrite_files(folder: Path, versions: list[dict[str, bytes]]) -> None:
    for turn in range(1000):
        write_files_atomic(folder, versions[turn % 2])


def _check_files(folder: Path, versions: list[dict[str, bytes]]) -> None:
    for name in versions[0]:
        data = (folder / name).read_bytes()
        assert data in (versions[0][name], versions[1][name]), f"{name} is torn ({len(data)} bytes)"


def test_bench_report_writer_killed_at_random_moments_leaves_each_file_whole(tmp_path):
    versions = _versions(1 << 20)
    folder = tmp_path / "bench"
    write_files_atomic(folder, versions[0])
    rng = random.Random(3)
    for _ in range(KILL_TRIALS):
        _kill_after(_rewrite_files, (folder, versions), rng.uniform(0.05, 0.6))
        _check_files(folder, versions)


def _rewrite_folder(destination: Path, versions: list[dict[str, bytes]]) -> None:
    for turn in range(1000):
        staged = staging_folder(destination)
        for name, data in versions[turn % 2].items():
            (staged / name).write_bytes(data)
        replace_folder(staged, destination)


def test_export_folder_swap_killed_at_random_moments_leaves_one_whole_version(tmp_path):
    versions = _versions(1 << 19)
    destination = tmp_path / "export"
    staged = staging_folder(destination)
    for name, data in versions[0].items():
        (staged / name).write_bytes(data)
    replace_folder(staged, destination)
    rng = random.Random(5)
    for _ in range(KILL_TRIALS):
        _kill_after(_rewrite_folder, (destination, versions), rng.uniform(0.05, 0.6))
        contents = {p.name: p.read_bytes() for p in destination.iterdir()}
        assert contents in versions, "the export folder is missing, partial or mixes two versions"


def _fit(profile: str, out: str, method: str) -> None:
    from dit_accel.planner.cli import main

    main(["fit", profile, "-o", out, "--method", method, "--quiet"], standalone_mode=False)


def test_fit_killed_at_random_moments_leaves_the_previous_plan_or_the_new_one(tmp_path):
    profile = str(write_synthetic_profile(tmp_path / "p.h5"))
    destination = tmp_path / "m.plan"
    _fit(profile, str(tmp_path / "new.plan"), "unicp")  # imports everything the forked writers then share
    start = time.perf_counter()
    _fit(profile, str(tmp_path / "new.plan"), "unicp")
    duration = time.perf_counter() - start
    _fit(profile, str(destination), "profilingdit")
    old, new = destination.read_bytes(), (tmp_path / "new.plan").read_bytes()
    rng = random.Random(11)
    outcomes = []
    for _ in range(KILL_TRIALS):
        _kill_after(_fit, (profile, str(destination), "unicp"), rng.uniform(0.2, 1.2) * duration)
        data = destination.read_bytes()
        assert data in (old, new), "the plan is torn"
        outcomes.append(data == new)
        destination.write_bytes(old)
    assert not all(outcomes), "no kill landed before the rename: the trials tested nothing"
