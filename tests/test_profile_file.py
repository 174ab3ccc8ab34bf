"""The profile file: a writer whose cost is linear and that survives kills, full disks and a second writer, and a
reader that refuses hostile files (validly sealed) with one line, within bounded time and memory.

The fuzz runs its cases in a worker process (`python tests/test_profile_file.py worker …`) under a CPU-time limit
per case, so a hang or a crash in HDF5's C code is counted against the reader instead of stopping the suite.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from dit_accel.harness.errors import DitAccelError
from dit_accel.planner.synthetic import SyntheticSpec, synthetic_arrays, synthetic_header, write_synthetic_profile
from dit_accel.profiler import schema
from dit_accel.profiler.schema import (
    FIELDS,
    ProfileError,
    ProfileLock,
    ProfileWriter,
    PromptInfo,
    open_profile,
    parts_folder,
    prompt_key,
    seal,
)

SPEC = SyntheticSpec(steps=6, blocks=3, prompts=2)
CASE_CPU_SECONDS = 5  # per fuzz case; the reader is refused long before this on every mutation we generate


def _prompts(indices) -> list[tuple[PromptInfo, dict[str, np.ndarray]]]:
    """Prompts `indices`, each with arrays seeded by its index (the same prompt always has the same data)."""
    return [
        (PromptInfo(prompt_key(i), i, f"prompt {i}", "", i), synthetic_arrays(SPEC, np.random.default_rng(i)))
        for i in indices
    ]


def _same(a: Path, b: Path) -> None:
    pa, pb = open_profile(a), open_profile(b)
    assert pa.prompts == pb.prompts
    for name in FIELDS:
        if pa.has(name):
            np.testing.assert_array_equal(pa.stack(name), pb.stack(name))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- the writer ----------------------------------------------------------------------------------------------------


def test_prompts_are_shards_until_finish_then_one_sealed_file(tmp_path):
    out = tmp_path / "p.h5"
    writer = ProfileWriter(out, synthetic_header(SPEC))
    for info, arrays in _prompts(range(3)):
        writer.add_prompt(info, arrays)
    assert not out.exists(), "the output appears only when assembled"
    assert sorted(p.name for p in parts_folder(out).iterdir()) == ["p00000.h5", "p00001.h5", "p00002.h5"]
    assert [p.index for p in open_profile(parts_folder(out) / "p00001.h5").prompts] == [1], "a shard is a profile"
    writer.finish()
    assert [p.index for p in open_profile(out).prompts] == [0, 1, 2]
    assert _leftovers(tmp_path) == [], "no shards, lock or temporaries remain"
    reference = tmp_path / "one_call.h5"
    ProfileWriter(reference, synthetic_header(SPEC)).add_prompts(_prompts(range(3)))
    _same(out, reference)
    assert _leftovers(tmp_path) == []


def test_more_prompts_on_a_complete_file_replace_it_only_when_assembled(tmp_path):
    out = tmp_path / "p.h5"
    ProfileWriter(out, synthetic_header(SPEC)).add_prompts(_prompts(range(2)))
    before = out.read_bytes()
    writer = ProfileWriter(out, None)
    for info, arrays in _prompts(range(2, 4)):
        writer.add_prompt(info, arrays)
    assert out.read_bytes() == before, "the complete file is untouched while new prompts are written"
    writer.finish()
    reference = tmp_path / "ref.h5"
    ProfileWriter(reference, synthetic_header(SPEC)).add_prompts(_prompts(range(4)))
    _same(out, reference)
    with pytest.raises(ProfileError, match="already holds prompt 1"):
        ProfileWriter(out, None).add_prompts(_prompts([1]))
    again = ProfileWriter(out, None)
    with pytest.raises(ProfileError, match="already holds prompt 3"):
        again.add_prompt(*_prompts([3])[0])
    again.close()
    assert _leftovers(tmp_path) == []


def test_a_kill_after_the_output_was_replaced_leaves_shards_the_next_writer_clears(tmp_path, monkeypatch):
    out = tmp_path / "p.h5"
    writer = ProfileWriter(out, synthetic_header(SPEC))
    for info, arrays in _prompts(range(3)):
        writer.add_prompt(info, arrays)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # stands for SIGKILL between the rename and the removal of the shards

    monkeypatch.setattr(schema.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    monkeypatch.undo()
    assert out.exists() and parts_folder(out).exists()
    (parts_folder(out) / ".p00003.h5.abc.tmp").write_bytes(b"half a shard")
    (tmp_path / ".p.h5.xyz.tmp").write_bytes(b"half an assembly")
    resumed = ProfileWriter(out, None)
    assert not list(tmp_path.glob(".p.h5.*.tmp")), "stale temporaries are removed under the lock"
    info, arrays = _prompts([3])[0]
    resumed.add_prompt(info, arrays)
    resumed.finish()
    reference = tmp_path / "ref.h5"
    ProfileWriter(reference, synthetic_header(SPEC)).add_prompts(_prompts(range(4)))
    _same(out, reference)
    assert _leftovers(tmp_path) == []


def test_a_failed_assembly_keeps_the_previous_file_and_the_shards(tmp_path, monkeypatch):
    out = tmp_path / "p.h5"
    ProfileWriter(out, synthetic_header(SPEC)).add_prompts(_prompts(range(2)))
    before = out.read_bytes()
    writer = ProfileWriter(out, None)
    info, arrays = _prompts([2])[0]
    writer.add_prompt(info, arrays)

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(schema, "seal", no_space)
    with pytest.raises(ProfileError) as caught:
        writer.finish()
    message = str(caught.value)
    assert "\n" not in message and f"folder {tmp_path} is full" in message
    assert out.read_bytes() == before
    assert (parts_folder(out) / "p00002.h5").exists(), "the finished prompt survives for --resume"
    assert not list(tmp_path.glob(".p.h5.*.tmp"))
    monkeypatch.undo()
    ProfileWriter(out, None).finish()
    assert [p.index for p in open_profile(out).prompts] == [0, 1, 2]


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_while_writing_a_prompt_is_one_line_and_keeps_the_file(tmp_path, monkeypatch, where):
    out = tmp_path / "p.h5"
    ProfileWriter(out, synthetic_header(SPEC)).add_prompts(_prompts(range(2)))
    before = out.read_bytes()
    writer = ProfileWriter(out, None)

    def no_space(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = schema._WriteGuard.write_through

    def write_through(guard, data):
        return no_space() if guard.tell() > 4096 else real(guard, data)

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", no_space)
    else:
        monkeypatch.setattr(schema._WriteGuard, "write_through", write_through)
    info, arrays = _prompts([2])[0]
    with pytest.raises(ProfileError) as caught:
        writer.add_prompt(info, arrays)
    monkeypatch.undo()
    assert "\n" not in str(caught.value) and f"folder {tmp_path} is full" in str(caught.value)
    assert out.read_bytes() == before
    assert not list(parts_folder(out).glob("*")), "no half-written shard"
    writer.close()


_FSIZE_WORKER = """
import resource, signal, sys
import numpy as np
from dit_accel.planner.synthetic import SyntheticSpec, synthetic_arrays
from dit_accel.profiler.schema import ProfileError, ProfileWriter, PromptInfo
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
spec = SyntheticSpec(steps=6, blocks=3)
writer = ProfileWriter(sys.argv[1], None)
arrays = synthetic_arrays(spec, np.random.default_rng(0))
arrays["video"] = np.random.default_rng(1).integers(0, 255, (16, 64, 64, 3), dtype=np.uint8)
try:
    writer.add_prompt(PromptInfo("p00002", 2, "big", "", 2), arrays)
except ProfileError as exc:
    print("refused:", exc)
writer.close()
"""


def test_a_real_write_failure_inside_hdf5_is_one_line_and_exits_cleanly(tmp_path):
    out = tmp_path / "p.h5"
    ProfileWriter(out, synthetic_header(SPEC)).add_prompts(_prompts(range(2)))
    before = out.read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", _FSIZE_WORKER, str(out), "65536"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr  # no crash when HDF5's handles are released at exit
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused:") and f"folder {tmp_path} is full" in lines[0], lines
    assert out.read_bytes() == before
    assert not list(parts_folder(out).glob("*")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path):
    out = tmp_path / "ro" / "p.h5"
    out.parent.mkdir()
    ProfileWriter(out, synthetic_header(SPEC)).add_prompts(_prompts(range(1)))
    before = out.read_bytes()
    out.parent.chmod(0o555)
    try:
        with pytest.raises(ProfileError, match=f"folder {out.parent} is not writable") as caught:
            ProfileWriter(out, None)
        assert "\n" not in str(caught.value)
    finally:
        out.parent.chmod(0o755)
    assert out.read_bytes() == before


def test_a_second_writer_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "p.h5"
    first = ProfileWriter(out, synthetic_header(SPEC))
    info, arrays = _prompts([0])[0]
    first.add_prompt(info, arrays)
    with pytest.raises(ProfileError, match="being written by another run") as caught:
        ProfileWriter(out, synthetic_header(SPEC))
    assert "\n" not in str(caught.value)
    code = f"from dit_accel.profiler.schema import ProfileLock; ProfileLock({str(out)!r}).acquire()"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "being written by another run" in other.stderr.strip().splitlines()[-1]
    info, arrays = _prompts([1])[0]
    first.add_prompt(info, arrays)
    first.finish()
    assert [p.index for p in open_profile(out).prompts] == [0, 1]
    with ProfileLock(out):  # free again, and its file goes with it
        pass
    assert _leftovers(tmp_path) == []


@pytest.mark.slow  # loads the default model in a subprocess
def test_dit_profile_refuses_an_output_another_run_is_writing(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "p.h5"
    with ProfileLock(out):
        result = subprocess.run(
            [sys.executable, "-m", "dit_accel.profiler", "--prompts", str(prompts), "-o", str(out), "--steps", "2"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert "being written by another run" in result.stderr
    assert not out.exists() and not parts_folder(out).exists()


def test_shards_without_resume_are_refused_with_how_to_continue(tmp_path):
    from dit_accel.profiler.run import _check_existing

    out = tmp_path / "p.h5"
    header = synthetic_header(SPEC)
    writer = ProfileWriter(out, header)
    info, arrays = _prompts([0])[0]
    writer.add_prompt(info, arrays)
    writer.close()
    with pytest.raises(DitAccelError, match="interrupted run left 1 finished prompt.*pass --resume"):
        _check_existing(out, header.fingerprint, header.settings, resume=False)
    assert _check_existing(out, header.fingerprint, header.settings, resume=True) == {0}


KILL_SPEC = SyntheticSpec(steps=40, blocks=12)


def _write_prompts(out: Path, count: int) -> None:
    """What a dit-profile run does with its writer: resume what exists, add each missing prompt, finish."""
    state = schema.written_prompts(out)
    done = {p.index for p in state[1]} if state else set()
    with ProfileWriter(out, None if state else synthetic_header(KILL_SPEC)) as writer:
        for i in range(count):
            if i not in done:
                arrays = synthetic_arrays(KILL_SPEC, np.random.default_rng(i))
                writer.add_prompt(PromptInfo(prompt_key(i), i, f"p{i}", "", i), arrays)


def _forked_write(out: Path, count: int) -> int:
    """Run `_write_prompts` in a forked child (no interpreter start-up, so a kill lands in the writing)."""
    child = os.fork()
    if child == 0:
        try:
            _write_prompts(out, count)
        finally:
            os._exit(0)
    return child


@pytest.mark.slow  # forked writers
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_write(tmp_path):
    count, trials = 12, 10
    reference = tmp_path / "reference.h5"
    start = time.perf_counter()
    os.waitpid(_forked_write(reference, count), 0)
    duration = time.perf_counter() - start
    rng = random.Random(3)
    states = []
    for trial in range(trials):
        out = tmp_path / f"t{trial}.h5"
        child = _forked_write(out, count)
        time.sleep(rng.uniform(0.0, duration * 1.1))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        states.append((out.exists(), len(list(parts_folder(out).glob("p*.h5")))))
        _write_prompts(out, count)
        _same(out, reference)
        assert not [name for name in _leftovers(tmp_path) if name.startswith(f".t{trial}.")]
    print(f"writing {count} prompts took {duration:.2f} s; (output exists, shards) when killed: {states}")
    assert len({shards for _, shards in states}) > 2, "the kills must land at different points of the run"


def test_written_bytes_grow_linearly_with_prompts():
    from dit_accel.bench.profile_write import measure

    rows = measure([1, 10], smoke=True)
    assert rows[1]["bytes"] / rows[0]["bytes"] < 12, rows


# --- hostile files -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("valid") / "valid.h5"
    write_synthetic_profile(path, SPEC)
    return path


def _edited(valid: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "hostile.h5"
    path.write_bytes(valid.read_bytes())
    with h5py.File(path, "a") as f:
        edit(f)
    seal(path)
    return path


def _replace(f: h5py.File, path: str, **create) -> None:
    if path in f:
        del f[path]
    f.create_dataset(path, **create)
    f[path].attrs["dims"] = json.dumps(FIELDS[_field_at(path)].dims) if _field_at(path) else "[]"


def _field_at(path: str) -> str | None:
    inner = path.split("/", 2)[-1]
    return next((name for name, spec in FIELDS.items() if spec.path == inner), None)


MOTION = "prompts/p00000/motion"


def _virtual(f: h5py.File) -> None:
    layout = h5py.VirtualLayout(shape=(2, 6, 3), dtype="float32")
    layout[:] = h5py.VirtualSource("/etc/passwd", "x", shape=(2, 6, 3))
    del f[MOTION]
    f.create_virtual_dataset(MOTION, layout)


def _link(f: h5py.File, link) -> None:
    del f[MOTION]
    f[MOTION] = link


HOSTILE = {
    "external storage": (
        lambda f: _replace(f, MOTION, shape=(2, 6, 3), dtype="float32", external=[("/etc/passwd", 0, 1 << 20)]),
        "external files",
    ),
    "virtual dataset": (_virtual, "virtual dataset"),
    "external link": (lambda f: _link(f, h5py.ExternalLink("/etc/passwd", "/")), "external link"),
    "soft link": (lambda f: _link(f, h5py.SoftLink("/timesteps")), "soft link"),
    "named datatype": (lambda f: f.__setitem__("prompts/p00000/norms/kind", np.dtype("f4")), "not part of the schema"),
    "extra dataset": (lambda f: f.create_dataset("prompts/p00000/secret", data=[1]), "not part of the schema"),
    "wrong dtype": (lambda f: _replace(f, MOTION, data=np.zeros((2, 6, 3), "f8")), "has dtype float64"),
    "wrong rank": (lambda f: _replace(f, MOTION, data=np.zeros((2, 6), "f4")), "has 2 dimensions"),
    "wrong block count": (lambda f: _replace(f, MOTION, data=np.zeros((2, 6, 4), "f4")), "4 along 'block'"),
    "wrong dims attribute": (
        lambda f: f[MOTION].attrs.__setitem__("dims", '["a", "b", "c"]'),
        "dims",
    ),
    "huge declared shape": (
        lambda f: _replace(f, MOTION, shape=(2, 6, 1 << 40), dtype="f4", chunks=(1, 1, 1024)),
        "values, more than any profile field",
    ),
    "gzip bomb": (
        lambda f: _replace(
            f, "prompts/p00000/video", data=np.zeros((64, 512, 512, 3), np.uint8), compression="gzip", chunks=True
        ),
        "bytes, more than this file's size allows",
    ),
    "shuffle filter": (
        lambda f: _replace(f, MOTION, data=np.zeros((2, 6, 3), "f4"), shuffle=True, chunks=True),
        "filters",
    ),
    "deep JSON": (lambda f: f.attrs.__setitem__("settings", "[" * 5000 + "]" * 5000), "nests JSON deeper"),
    "giant attribute": (lambda f: f.attrs.__setitem__("adapter", "x" * (2 << 20)), "longer than"),
    "prompt index mismatch": (lambda f: f["prompts/p00000"].attrs.__setitem__("index", 7), "holds prompt index 7"),
    "three branches": (lambda f: f.attrs.__setitem__("branches", '["a", "b", "c"]'), "branches"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_structure_is_refused_before_any_data_is_read(valid, tmp_path, case):
    edit, message = HOSTILE[case]
    path = _edited(valid, tmp_path, edit)
    with pytest.raises(ProfileError, match=message) as caught:
        profile = open_profile(path)
        for info in profile.prompts:
            profile.read_all(info)
    assert "\n" not in str(caught.value)


def _chunk_bomb(f: h5py.File) -> None:
    """A chunk whose deflate stream inflates far past its declared chunk size."""
    name = "prompts/p00000/features/queries"
    dataset = f[name]
    offset = (0,) * dataset.ndim
    dataset.id.write_direct_chunk(offset, zlib.compress(bytes(64 << 20), 9))


VALUES = {
    "negative rel_l1": ("residual_rel_l1", -0.5, "prompt 0 field residual_rel_l1 holds values"),
    "infinite norm": ("residual_norm", np.inf, "prompt 0 field residual_norm holds infinite"),
    "cos distance above 2": ("output_cos", 3.0, "prompt 0 field output_cos holds values"),
    "NaN attention": ("attention_received", np.nan, "prompt 0 field attention_received holds NaN"),
    "NaN features": ("feature_keys", np.nan, "prompt 0 field feature_keys holds NaN"),
}


def _with_value(valid: Path, tmp_path: Path, name: str, value: float) -> Path:
    def edit(f):
        path = f"prompts/p00000/{FIELDS[name].path}"
        data = f[path][()]
        data.flat[min(7, data.size - 1)] = value
        _replace(f, path, data=data)

    return _edited(valid, tmp_path, edit)


@pytest.mark.parametrize("case", list(VALUES), ids=list(VALUES))
def test_values_no_recording_holds_are_refused_naming_prompt_and_field(valid, tmp_path, case):
    name, value, message = VALUES[case]
    profile = open_profile(_with_value(valid, tmp_path, name, value))
    with pytest.raises(ProfileError, match=message) as caught:
        profile.stack(name)
    assert "\n" not in str(caught.value)


def test_fitting_a_profile_with_impossible_drift_is_one_line(valid, tmp_path):
    from dit_accel.planner.methods import FitOptions, fit_plan

    path = _with_value(valid, tmp_path, "residual_rel_l1", -0.5)
    with pytest.raises(DitAccelError, match="prompt 0 field residual_rel_l1 holds values") as caught:
        fit_plan([str(path)], FitOptions())
    assert "\n" not in str(caught.value)


def test_nan_where_the_recorder_marks_unrecorded_steps_is_accepted(valid):
    profile = open_profile(valid)
    assert np.isnan(profile.read(0, "residual_rel_l1")[:, 0]).all()


def test_a_chunk_that_inflates_past_its_size_is_refused(valid, tmp_path):
    path = _edited(valid, tmp_path, _chunk_bomb)
    with pytest.raises(ProfileError, match="inflates past its declared") as caught:
        open_profile(path).read(0, "feature_queries")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_only_regular_files_are_opened(tmp_path, kind):
    path = tmp_path / "x.h5"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    start = time.perf_counter()
    with pytest.raises(ProfileError, match="is not a regular file"):
        open_profile(path)
    assert time.perf_counter() - start < 2.0


# --- the fuzz ------------------------------------------------------------------------------------------------------

_MUTATIONS = (
    "bitflip",
    "truncate",
    "overwrite",
    "dtype",
    "shape",
    "dims_attr",
    "value",
    "huge_shape",
    "external",
    "external_link",
    "virtual",
    "soft_link",
    "deep_json",
    "giant_attr",
    "attr_type",
    "extra_object",
    "chunk_bomb",
    "gzip_bomb",
)


def _mutate(valid: bytes, path: Path, case: int) -> str:
    """Write mutation `case` of the valid profile to `path`, resealed; returns the mutation's kind."""
    rng = random.Random(case)
    kind = _MUTATIONS[case % len(_MUTATIONS)]
    data = bytearray(valid)
    body = schema.USERBLOCK_BYTES + 8
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(body, len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(body, len(data))]
    elif kind == "overwrite":
        start = rng.randrange(body, len(data))
        data[start : start + 32] = bytes(rng.randrange(256) for _ in range(32))[: len(data) - start]
    path.write_bytes(bytes(data))
    if kind not in ("bitflip", "truncate", "overwrite"):
        with h5py.File(path, "a") as f:
            _STRUCTURAL[kind](f, rng)
    seal(path)
    return kind


def _a_field(f: h5py.File, rng: random.Random, kinds: str = "fiu") -> tuple[str, str]:
    key = rng.choice(sorted(f["prompts"]))
    names = [n for n, s in FIELDS.items() if s.path in f["prompts"][key] and np.dtype(s.dtype).kind in kinds]
    name = rng.choice(sorted(names))
    return f"prompts/{key}/{FIELDS[name].path}", name


def _random_dtype(f, rng):
    path, _ = _a_field(f, rng)
    _replace(f, path, data=np.zeros(f[path].shape, rng.choice(["f8", "i8", "u2", "S4", "c8"])))


def _random_shape(f, rng):
    path, _ = _a_field(f, rng)
    _replace(f, path, data=np.zeros([rng.randint(0, 9) for _ in range(rng.randint(0, 5))], f[path].dtype))


def _random_dims(f, rng):
    path, _ = _a_field(f, rng)
    f[path].attrs["dims"] = rng.choice(['["x"]', "not json", "[[[]]]", '{"a": 1}', "", json.dumps(["branch"] * 9)])


def _random_value(f, rng):
    path, _ = _a_field(f, rng, "f")
    data = f[path][()]
    if data.size:
        data.flat[rng.randrange(data.size)] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 1e30, -1e-3, 2.5])
    _replace(f, path, data=data)


def _huge_shape(f, rng):
    path, _ = _a_field(f, rng)
    shape = tuple(rng.choice([1 << 20, 1 << 31, 1 << 40]) for _ in f[path].shape) or (1,)
    _replace(f, path, shape=shape, dtype=f[path].dtype, chunks=tuple(1 for _ in shape), maxshape=shape)


def _external(f, rng):
    path, _ = _a_field(f, rng)
    shape, dtype = f[path].shape, f[path].dtype
    _replace(f, path, shape=shape, dtype=dtype, external=[(rng.choice(["/etc/passwd", "/dev/zero"]), 0, 1 << 20)])


def _external_link(f, rng):
    path, _ = _a_field(f, rng)
    del f[path]
    f[path] = h5py.ExternalLink(rng.choice(["/etc/passwd", "/dev/zero", "other.h5"]), "/")


def _virtual_dataset(f, rng):
    path, _ = _a_field(f, rng)
    shape, dtype = f[path].shape, f[path].dtype
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[...] = h5py.VirtualSource(rng.choice(["/etc/passwd", "."]), "/timesteps", shape=shape)
    del f[path]
    f.create_virtual_dataset(path, layout)


def _soft_link(f, rng):
    path, _ = _a_field(f, rng)
    del f[path]
    f[path] = h5py.SoftLink(rng.choice(["/timesteps", "/", "/prompts", "/missing"]))


def _deep_json(f, rng):
    depth = rng.choice([20, 1000, 100_000])
    target = rng.choice(["settings", "model_fingerprint", "branches"])
    f.attrs[target] = "[" * depth + "]" * depth


def _giant_attr(f, rng):
    text = "x" * rng.choice([(1 << 20) + 1, 4 << 20])
    key = rng.choice(sorted(f["prompts"]))
    obj, name = rng.choice([(f, "adapter"), (f, "settings"), (f["prompts"][key], "prompt")])
    obj.attrs[name] = text


def _attr_type(f, rng):
    key = rng.choice(sorted(f["prompts"]))
    obj, name = rng.choice([(f, "grid"), (f, "model_flops"), (f, "schema_version"), (f["prompts"][key], "index")])
    obj.attrs[name] = rng.choice([np.zeros((3, 3)), "text", np.arange(100), -1, 1 << 62])


def _extra_object(f, rng):
    key = rng.choice(sorted(f["prompts"]))
    where = rng.choice(["/", "/prompts", f"/prompts/{key}", f"/prompts/{key}/drift", "/cost"])
    choice = rng.randrange(3)
    if choice == 0:
        f[where].create_dataset("extra", data=np.arange(4))
    elif choice == 1:
        f[where].create_group("extra")
    else:
        f[f"{where.rstrip('/')}/extra"] = np.dtype("f4")


def _chunk_bomb_random(f, rng):
    path, _ = _a_field(f, rng, "f")
    dataset = f[path]
    if dataset.chunks is None:
        _replace(f, path, data=dataset[()], compression="gzip", chunks=True)
        dataset = f[path]
    if dataset.chunks is not None:
        dataset.id.write_direct_chunk((0,) * dataset.ndim, _zeros_deflated(rng.choice([1, 16, 64])))


@functools.cache
def _zeros_deflated(megabytes: int) -> bytes:
    return zlib.compress(bytes(megabytes << 20), 9)


def _gzip_bomb(f, rng):
    key = rng.choice(sorted(f["prompts"]))
    shape = (rng.choice([64, 256]), 512, 512, 3)
    if "video" in f[f"prompts/{key}"]:
        del f[f"prompts/{key}/video"]
    f.create_dataset(f"prompts/{key}/video", shape=shape, dtype="u1", compression="gzip", chunks=(1, 512, 512, 3))
    f[f"prompts/{key}/video"][0] = 0
    f[f"prompts/{key}/video"].attrs["dims"] = json.dumps(FIELDS["video"].dims)


_STRUCTURAL = {
    "dtype": _random_dtype,
    "shape": _random_shape,
    "dims_attr": _random_dims,
    "value": _random_value,
    "huge_shape": _huge_shape,
    "external": _external,
    "external_link": _external_link,
    "virtual": _virtual_dataset,
    "soft_link": _soft_link,
    "deep_json": _deep_json,
    "giant_attr": _giant_attr,
    "attr_type": _attr_type,
    "extra_object": _extra_object,
    "chunk_bomb": _chunk_bomb_random,
    "gzip_bomb": _gzip_bomb,
}


def _open_and_fit(path: Path) -> None:
    from dit_accel.planner.methods import FitOptions, fit_plan

    profile = open_profile(path)
    for info in profile.prompts:
        profile.read_all(info)
    fit_plan([str(path)], FitOptions())


def _worker(valid: str, folder: str, first: int, last: int) -> None:
    """Run cases first … last-1, one JSON line each; the CPU limit is re-armed per case (SIGXCPU ends a hang)."""
    data = Path(valid).read_bytes()
    _open_and_fit(Path(valid))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    for case in range(first, last):
        used = resource.getrusage(resource.RUSAGE_SELF)
        resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime) + CASE_CPU_SECONDS, hard))
        path = Path(folder) / f"case{case}.h5"
        try:
            kind = _mutate(data, path, case)
        except ProfileError:
            kind, outcome, detail = "unsealable", "refused", ""
        else:
            outcome, detail, start = "loaded", "", time.process_time()
            try:
                _open_and_fit(path)
            except DitAccelError as exc:
                outcome, detail = "refused", str(exc)
            except Exception as exc:  # noqa: BLE001 - the point: any other exception is a finding
                outcome, detail = "foreign", f"{type(exc).__name__}: {str(exc)[:200]}"
            detail = detail if outcome == "foreign" else ("\n" in detail and "multi-line") or ""
            detail += f" cpu={time.process_time() - start:.2f}"
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
        size = path.stat().st_size if path.exists() else 0
        print(json.dumps({"case": case, "kind": kind, "outcome": outcome, "detail": detail, "growth_kb": growth,
                          "file_bytes": size}), flush=True)  # fmt: skip
        path.unlink(missing_ok=True)


def run_fuzz(valid: Path, folder: Path, cases: int) -> dict:
    """All cases through workers; a worker killed by a signal counts its case as a hang (SIGXCPU) or crash."""
    results, case = [], 0
    while case < cases:
        worker = subprocess.run(
            [sys.executable, __file__, "worker", str(valid), str(folder), str(case), str(cases)],
            capture_output=True,
            text=True,
        )
        lines = [json.loads(line) for line in worker.stdout.splitlines() if line.startswith("{")]
        results += lines
        case = lines[-1]["case"] + 1 if lines else case
        if worker.returncode != 0:
            kind = "hang" if worker.returncode in (-signal.SIGXCPU, -signal.SIGKILL) else "crash"
            results.append({"case": case, "kind": _MUTATIONS[case % len(_MUTATIONS)], "outcome": kind,
                            "detail": worker.stderr[-300:], "growth_kb": 0, "file_bytes": 0})  # fmt: skip
            case += 1
    return _summary(results)


def _summary(results: list[dict]) -> dict:
    outcomes = {name: sum(r["outcome"] == name for r in results) for name in ("loaded", "refused", "foreign")}
    outcomes["hangs"] = sum(r["outcome"] == "hang" for r in results)
    outcomes["crashes"] = sum(r["outcome"] == "crash" for r in results)
    return {
        "cases": len(results),
        **outcomes,
        "multi_line": sum("multi-line" in r["detail"] for r in results),
        "findings": [r for r in results if r["outcome"] in ("foreign", "hang", "crash")][:10],
        "worst_cpu_s": max(float(r["detail"].rsplit("cpu=", 1)[-1] or 0) for r in results if "cpu=" in r["detail"]),
        "peak_growth_mb": max(r["growth_kb"] for r in results) / 1024,
        "largest_file_kb": max(r["file_bytes"] for r in results) / 1024,
    }


def _check_fuzz(summary: dict, cases: int) -> None:
    print(f"profile fuzz: {json.dumps(summary)}")
    assert summary["cases"] == cases
    assert summary["foreign"] == summary["hangs"] == summary["crashes"] == 0, summary["findings"]
    assert summary["multi_line"] == 0
    assert summary["refused"] > cases // 2, "the mutations must mostly produce refusals, or they test nothing"
    assert summary["peak_growth_mb"] < 256, "memory beyond the reader's bound (64 x file + 16 MiB, and the fit)"


def test_profile_fuzz_hundred_cases(valid, tmp_path):
    _check_fuzz(run_fuzz(valid, tmp_path, 100), 100)


@pytest.mark.slow
def test_profile_fuzz_thousand_cases(valid, tmp_path):
    _check_fuzz(run_fuzz(valid, tmp_path, 1000), 1000)


_HEAVY = ("gzip_bomb", "chunk_bomb", "huge_shape", "giant_attr", "deep_json", "value")


def _read_everything(path: Path) -> None:
    profile = open_profile(path)
    for info in profile.prompts:
        profile.read_all(info)


def _memory_worker(valid: str, folder: str, cases: list[int]) -> None:
    """Peak memory of reading each case, in a forked child: its high-water mark minus its size at the fork."""
    data = Path(valid).read_bytes()
    _read_everything(Path(valid))
    for case in cases:
        path = Path(folder) / f"memory{case}.h5"
        kind = _mutate(data, path, case)
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                _read_everything(path)
            except DitAccelError:
                pass
            os.write(write_end, str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start).encode())
            os._exit(0)
        os.waitpid(child, 0)
        growth = int(os.read(read_end, 64) or -1)
        print(json.dumps({"case": case, "kind": kind, "growth_kb": growth, "file_bytes": path.stat().st_size}))
        path.unlink()


@pytest.mark.slow
def test_reading_the_heaviest_mutations_stays_within_the_memory_bound(valid, tmp_path):
    cases = [c for c in range(len(_MUTATIONS) * 6) if _MUTATIONS[c % len(_MUTATIONS)] in _HEAVY]
    result = subprocess.run(
        [sys.executable, __file__, "memory", str(valid), str(tmp_path), ",".join(map(str, cases))],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(cases) and all(r["growth_kb"] >= 0 for r in rows)
    worst = max(rows, key=lambda r: r["growth_kb"])
    print(f"worst read: {worst['kind']} grew {worst['growth_kb'] / 1024:.1f} MB for a {worst['file_bytes']} byte file")
    for row in rows:
        bound = schema.DATA_EXPANSION * row["file_bytes"] + schema.DATA_SLACK_BYTES + 2 * row["file_bytes"]
        assert row["growth_kb"] * 1024 <= bound, row


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
elif __name__ == "__main__" and sys.argv[1:2] == ["memory"]:
    _memory_worker(sys.argv[2], sys.argv[3], [int(c) for c in sys.argv[4].split(",")])
