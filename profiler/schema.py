"""The profile HDF5 schema: the only module that knows where anything lives in a profile file.

A profile holds one profiling run (or merged shards of several). Writers call `ProfileWriter`; readers call
`open_profile`, which returns numpy arrays by field name. Every dataset carries its dimension names in a `dims`
attribute; the root carries the schema version and the model fingerprint. See docs/profile-format.md.

Integrity: every profile starts with a 512-byte HDF5 user block (which HDF5 ignores) holding a magic string and
the SHA-256 of the rest of the file. `open_profile` verifies it before the HDF5 library parses anything, so a
truncated, bit-flipped or edited file is refused with a message instead of reaching HDF5's C parser.

Hostile files: a correct seal does not make a file trustworthy. Before any data is read, `open_profile` walks the
whole file and refuses links, external or virtual storage, filters other than gzip, objects the schema does not
define, dtypes, ranks and dimensions that disagree with the schema and the root grids, and declared sizes beyond
`DATA_EXPANSION` × the file size + `DATA_SLACK_BYTES` in total; `h5_safe` inflates chunks itself with a bounded
output. Every field read is range-checked (`Field.values`) before a consumer sees it.

Crash safety and cost: `ProfileWriter.add_prompt` writes each finished prompt atomically as its own small sealed
profile ("shard") in a hidden folder beside the output (`.<name>.parts/`); `finish` assembles the final file from
the previous output and the shards in one atomic replacement, then removes the folder. Each prompt's bytes are
written about twice however many prompts there are (the old writer copied the whole file per prompt). A run killed
at any moment loses at most the prompt in progress; the next writer (`dit-profile --resume`) picks the shards up.
One writer per output at a time: a lock file beside it (`fcntl.flock`) refuses a second.

Example:
    >>> profile = open_profile("wan.h5")
    >>> drift = profile.stack("residual_rel_l1")     # (prompt, branch, step, block)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dit_accel.harness.errors import DitAccelError
from dit_accel.harness.files import atomic_path, sync_folder
from dit_accel.runtime.plan import ModelFingerprint

from . import h5_safe
from .h5_safe import Limits, UnsafeHdf5

SCHEMA_VERSION = 1
FORMAT_NAME = "dit-profile"
USERBLOCK_BYTES = 512
SEAL_MAGIC = b"DIT-PROFILE-SHA256:"
MAX_FIELD_VALUES = (
    1 << 28
)  # 268 M values per field: 10x Wan-1.3B's largest field, a stated bound on what a read allocates
DATA_EXPANSION = 64  # declared data may exceed the file size this many times (gzip); real profiles: about 1.1x
DATA_SLACK_BYTES = 16 << 20  # ... plus this much, for small files of well-compressed fields (a flat 4 MB video)
MAX_ATTR_BYTES = 1 << 20  # any text attribute: prompts, settings, the model fingerprint
MAX_JSON_DEPTH = 16  # real headers nest 2 levels
MAX_GRID = 1 << 16  # per token-grid axis
COS_SLACK = 1e-3  # rounding of float32 cosine distances and attention probabilities around their bounds


class ProfileError(DitAccelError):
    """A profile file is missing, corrupt, of another schema, or lacks what a consumer needs."""


@dataclass(frozen=True)
class Values:
    """What a field's values may be: within [low, high], and NaN only where the recorder marks "not recorded"."""

    low: float = -math.inf
    high: float = math.inf
    nan_means_unrecorded: bool = False


_DRIFT = Values(0.0, math.inf, True)  # relative L1, norms, squared norms, errors: >= 0, NaN where not recorded
_COS_DISTANCE = Values(-COS_SLACK, 2.0 + COS_SLACK, True)  # 1 - cos
_ATTENTION = Values(0.0)  # attention weights: >= 0, always recorded (not capped at 1: synthetic profiles scale them)


@dataclass(frozen=True)
class Field:
    """One per-prompt dataset: its path inside the prompt's group, dimension names, storage dtype, allowed values, and
    the recording setting (`RecordSettings` field) that asks for it, where one does."""

    path: str
    dims: tuple[str, ...]
    dtype: str
    values: Values = Values()
    setting: str | None = None


# Per-prompt fields. Branch order is the file's `branches` attribute; steps and blocks follow the root grids.
FIELDS: dict[str, Field] = {
    "residual_rel_l1": Field("drift/residual_rel_l1", ("branch", "step", "block"), "float32", _DRIFT),
    "residual_cos": Field("drift/residual_cos", ("branch", "step", "block"), "float32", _COS_DISTANCE),
    "output_rel_l1": Field("drift/output_rel_l1", ("branch", "step", "block"), "float32", _DRIFT),
    "output_cos": Field("drift/output_cos", ("branch", "step", "block"), "float32", _COS_DISTANCE),
    "residual_norm": Field("norms/residual", ("branch", "step", "block"), "float32", _DRIFT),
    "output_norm": Field("norms/output", ("branch", "step", "block"), "float32", _DRIFT),
    "model_output_rel_l1": Field("model_output/rel_l1", ("branch", "step"), "float32", _DRIFT),
    "attention_rel_l1": Field("drift/attention_rel_l1", ("branch", "step", "block"), "float32", _DRIFT),
    "motion": Field("motion", ("branch", "step", "block"), "float32", Values(0.0, 1.0 + COS_SLACK, True)),
    "attention_steps": Field("attention/steps", ("attention_step",), "int32"),
    "attention_received": Field(
        "attention/received",
        ("attention_step", "block", "frame", "height", "width"),
        "float16",
        _ATTENTION,
        "record_attention",
    ),
    "query_index": Field("attention/query_index", ("query",), "int32"),
    "cross_attention": Field(
        "attention/cross", ("attention_step", "block", "query", "text_token"), "float16", _ATTENTION
    ),
    "foreground": Field("foreground", ("frame", "height", "width"), "uint8", Values(0, 1), "record_attention"),
    "feature_queries": Field(
        "features/queries", ("block", "sample", "head", "channel"), "float16", setting="record_features"
    ),
    "feature_keys": Field(
        "features/keys", ("block", "sample", "head", "channel"), "float16", setting="record_features"
    ),
    "video": Field("video", ("frame", "pixel_height", "pixel_width", "rgb"), "uint8"),
    "step_sensitivity": Field("sensitivity/final_error", ("step",), "float32", _DRIFT),
    "reuse_gram": Field("reuse/gram", ("branch", "step", "lag", "lag"), "float32", Values(nan_means_unrecorded=True)),
    "stack_output_sq": Field("reuse/stack_output_sq", ("branch", "step"), "float32", _DRIFT),
    "stack_residual_sq": Field("reuse/stack_residual_sq", ("branch", "step"), "float32", _DRIFT),
}
_ROOT_ARRAYS = {
    "timesteps": ("timesteps", ("step",), "float64", Values()),
    "sigmas": ("sigmas", ("step",), "float64", Values(0.0)),
    "block_flops": ("cost/flops", ("block",), "int64", Values(0.0)),
    "block_seconds": ("cost/seconds", ("block",), "float64", Values(0.0)),
}
# The file's tree: every group and dataset a profile may hold (a prompt group's subtree is built from FIELDS).
_ROOT_TREE = {
    "timesteps": "timesteps",
    "sigmas": "sigmas",
    "cost": {"flops": "block_flops", "seconds": "block_seconds"},
}
_PROMPT_KEY = re.compile(r"p\d{5,9}")
_UNTIED_DIMS = {("video", "frame")}  # video frames are pixel frames, not the token grid's (Wan: 81 vs 21)


def _tree(paths: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, path in paths.items():
        *groups, leaf = path.split("/")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = name
    return tree


_PROMPT_TREE = _tree({name: spec.path for name, spec in FIELDS.items()})


@dataclass(frozen=True)
class ProfileHeader:
    """Everything a profile says about the run as a whole."""

    fingerprint: ModelFingerprint
    settings: dict[str, Any]
    branches: tuple[str, ...]
    grid: tuple[int, int, int]
    adapter: str
    cfg_mode: str
    timesteps: np.ndarray
    sigmas: np.ndarray
    block_flops: np.ndarray
    block_seconds: np.ndarray
    model_flops: int
    model_seconds: float

    def compatible_with(self, other: ProfileHeader) -> str | None:
        """Why two profiles cannot be merged (a one-line reason), or None if they can."""
        if self.fingerprint != other.fingerprint:
            return (
                f"profiles are of different models ({self.fingerprint.transformer_class} "
                f"{self.fingerprint.config_hash[:12]}… vs {other.fingerprint.transformer_class} "
                f"{other.fingerprint.config_hash[:12]}…)"
            )
        if self.settings != other.settings:
            differ = sorted(
                k for k in set(self.settings) | set(other.settings) if self.settings.get(k) != other.settings.get(k)
            )
            return f"profiles were recorded with different settings ({', '.join(differ)})"
        return None


@dataclass(frozen=True)
class PromptInfo:
    """One profiled prompt: its group name and what it was generated with."""

    key: str
    index: int
    prompt: str
    negative_prompt: str
    seed: int


def prompt_key(index: int) -> str:
    return f"p{index:05d}"


# --- writing -------------------------------------------------------------------------------------------------------


def parts_folder(path: str | os.PathLike) -> Path:
    """The hidden folder beside `path` holding the finished prompts of a run not yet assembled into `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.parts")


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


class ProfileLock:
    """An exclusive lock on one output path (`flock` on a hidden lock file beside it): one writer at a time.

    The lock file is removed on release; a process that locked a file another one had just removed notices (the
    path no longer names the file it locked) and reports the output as busy rather than write beside it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> ProfileLock:
        """Take the lock, or raise a one-line `ProfileError` if another writer holds it or the folder refuses."""
        lock = _lock_path(self.path)
        with _writing(self.path):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                raise BlockingIOError
        except OSError:
            os.close(fd)
            raise ProfileError(
                f"{self.path} is being written by another run (it holds {lock}); wait for it or choose another output"
            ) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (a no-op when not held)."""
        if self._fd is not None:
            _lock_path(self.path).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ProfileLock:
        return self.acquire()

    def __exit__(self, *_: Any) -> None:
        self.release()


class ProfileWriter:
    """Writes a profile prompt by prompt: each as a sealed shard beside the output, the output assembled once.

    `add_prompt` makes a prompt durable (its shard is written atomically); `finish` assembles the output. The
    one-call form `ProfileWriter(path, header).add_prompts(prompts)` writes all prompts straight into one atomic
    replacement of the output. As a context manager, a block that ends without error finishes the file; one that
    raises keeps the shards for `dit-profile --resume`.

    Example:
        >>> with ProfileWriter("wan.h5", header) as writer:
        ...     for info, arrays in recorded():
        ...         writer.add_prompt(info, arrays)
    """

    def __init__(self, path: str | os.PathLike, header: ProfileHeader | None, lock: ProfileLock | None = None) -> None:
        """Writer for `path`, holding `lock` (or taking its own). `header` may be None when `path` or unfinished
        shards of it exist; otherwise it is the header of the new file."""
        self.path = Path(path)
        self.parts = parts_folder(self.path)
        self._own_lock = lock is None
        self._lock = lock or ProfileLock(self.path).acquire()
        try:
            self._remove_stale()
            self.header = self._resolve_header(header)
            self._in_output = {p.index for p in open_profile(self.path).prompts} if self.path.exists() else set()
        except BaseException:
            self.close()
            raise

    def _resolve_header(self, header: ProfileHeader | None) -> ProfileHeader:
        state = written_prompts(self.path)
        if state is None:
            if header is None:
                raise ProfileError(f"{self.path} does not exist and no header was given to create it")
            return header
        reason = header.compatible_with(state[0]) if header is not None else None
        if reason:
            raise ProfileError(f"cannot add to {self.path}: {reason}")
        return state[0]

    def _remove_stale(self) -> None:
        """Temporaries of writers killed mid-write (safe to remove: this writer holds the output's lock)."""
        for stale in [*self.path.parent.glob(f".{self.path.name}.*.tmp"), *self.parts.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)

    def add_prompt(self, info: PromptInfo, arrays: dict[str, np.ndarray]) -> None:
        """Make one complete prompt durable: written atomically as a sealed shard; `finish` puts it in the output."""
        _check_fields(arrays)
        if info.index in self._in_output:
            raise ProfileError(f"{self.path} already holds prompt {info.index}")
        with _writing(self.path):
            self.parts.mkdir(exist_ok=True)
            _write_file(self.parts / f"{info.key}.h5", self.header, [], [(info, arrays)])

    def add_prompts(self, prompts: list[tuple[PromptInfo, dict[str, np.ndarray]]]) -> None:
        """Append several complete prompts in one atomic replacement of the output, then close the writer."""
        for _, arrays in prompts:
            _check_fields(arrays)
        try:
            self._assemble(prompts)
        finally:
            self.close()

    def finish(self) -> None:
        """Assemble the output from the previous file and every shard, remove the shards, close the writer."""
        try:
            self._assemble([])
        finally:
            self.close()

    def close(self) -> None:
        """Release the lock this writer took; shards not yet assembled stay for a resumed run."""
        if self._own_lock:
            self._lock.release()

    def __enter__(self) -> ProfileWriter:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        if kind is None:
            self.finish()
        else:
            self.close()

    def _assemble(self, extra: list[tuple[PromptInfo, dict[str, np.ndarray]]]) -> None:
        sources = _sources(self.path, self.header)
        held = {info.index for _, infos in sources for info in infos}
        repeated = sorted(held & {info.index for info, _ in extra})
        if repeated:
            raise ProfileError(f"{self.path} already holds prompt {repeated[0]}")
        if extra or len(sources) > 1 or not self.path.exists():
            with _writing(self.path):
                _write_file(self.path, self.header, sources, extra)
        if self.parts.exists():
            shutil.rmtree(self.parts)
            sync_folder(self.path.parent)


def _check_fields(arrays: dict[str, np.ndarray]) -> None:
    unknown = set(arrays) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown profile fields: {sorted(unknown)}")


def _sources(path: Path, header: ProfileHeader) -> list[tuple[Path, list[PromptInfo]]]:
    """Files whose prompts go into `path`: the output itself, then each shard holding a prompt it lacks."""
    sources, held = [], set()
    if path.exists():
        existing = open_profile(path)
        sources.append((path, existing.prompts))
        held = {info.index for info in existing.prompts}
    for shard, infos in _shards(path, header):
        if infos[0].index not in held:
            sources.append((shard, infos))
    return sources


def _shards(path: Path, header: ProfileHeader | None) -> list[tuple[Path, list[PromptInfo]]]:
    """Every shard of `path` with its one prompt, checked to be complete and to match `header` (if given)."""
    found = []
    for shard in sorted(parts_folder(path).glob("p*.h5")):
        profile = open_profile(shard)
        if [p.key for p in profile.prompts] != [shard.stem]:
            raise ProfileError(f"{shard} is not a finished prompt of {path.name}; remove it to re-profile that prompt")
        reason = header.compatible_with(profile.header) if header is not None else None
        if reason:
            raise ProfileError(f"{shard} does not belong to {path}: {reason}")
        header = header or profile.header
        found.append((shard, profile.prompts))
    return found


def written_prompts(path: str | os.PathLike) -> tuple[ProfileHeader, list[PromptInfo]] | None:
    """The header and complete prompts of `path` together with its unfinished shards; None if neither exists."""
    path = Path(path)
    existing = open_profile(path) if path.exists() else None
    shards = _shards(path, existing.header if existing else None)
    if existing is None and not shards:
        return None
    header = existing.header if existing else open_profile(shards[0][0]).header
    infos = {info.index: info for _, found in shards for info in found}
    infos.update({info.index: info for info in (existing.prompts if existing else [])})
    return header, [infos[i] for i in sorted(infos)]


def _write_file(
    path: Path,
    header: ProfileHeader,
    sources: list[tuple[Path, list[PromptInfo]]],
    extra: list[tuple[PromptInfo, dict[str, np.ndarray]]],
) -> None:
    """Write a sealed profile atomically: header, prompts copied from `sources` (as stored), and `extra`."""
    with atomic_path(path) as tmp:
        with _WriteGuard(tmp) as guard:
            with h5py.File(guard, "w", userblock_size=USERBLOCK_BYTES) as f:
                _write_header(f, header)
                for source, infos in sources:
                    with h5py.File(source, "r") as src:
                        for info in infos:
                            f.copy(src["prompts"][info.key], f["prompts"], name=info.key)
                for info, arrays in extra:
                    _write_prompt(f, info, arrays)
            guard.raise_failure()
        seal(tmp)


class _WriteGuard(io.RawIOBase):
    """The file HDF5 writes a profile through (h5py's file-object driver), so that a failed write cannot crash it.

    HDF5 (2.0) segfaults when it closes a file whose writes failed (a full disk; found by tests/test_profile_file.py).
    Here the first failure is recorded and every write reported to HDF5 as done, so HDF5 closes the file normally;
    `raise_failure` then raises the recorded error, and the caller discards the temporary file.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.failure: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(buffer)

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self.failure is None:
            try:
                return self.write_through(data)
            except OSError as exc:
                self.failure = exc
        self._file.seek(size, os.SEEK_CUR)
        return size

    def write_through(self, data: Any) -> int:
        """Write to the real file (the one place a full disk or a read-only file system shows)."""
        return self._file.write(data)

    def truncate(self, size: int | None = None) -> int:
        if self.failure is None:
            try:
                return self._file.truncate(size)
            except OSError as exc:
                self.failure = exc
        return self._file.tell() if size is None else size

    def flush(self) -> None:
        """Nothing to flush (unbuffered); the caller syncs the file once it is complete."""

    def close(self) -> None:
        self._file.close()
        super().close()

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


_WRITE_FAILURES = {
    **dict.fromkeys((errno.ENOSPC, errno.EDQUOT, errno.EFBIG), "is full"),
    **dict.fromkeys((errno.EACCES, errno.EPERM, errno.EROFS), "is not writable"),
    errno.ENOENT: "does not exist",
}


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """OS and HDF5 write failures (full disk, read-only folder) become one `ProfileError` line naming the folder."""
    try:
        yield
    except OSError as exc:
        code = exc.errno or _errno_in(str(exc))
        state = _WRITE_FAILURES.get(code, "is full or not writable")
        reason = (exc.strerror or str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200]
        raise ProfileError(
            f"cannot write {path.name}: folder {path.parent} {state} ({reason}); the previous file is unchanged"
        ) from None


def _errno_in(message: str) -> int | None:
    """HDF5 reports the system error inside its message (`errno = 28`)."""
    found = re.search(r"errno = (\d+)", message)
    return int(found.group(1)) if found else None


def _write_header(f: h5py.File, header: ProfileHeader) -> None:
    f.attrs["format"] = FORMAT_NAME
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["model_fingerprint"] = json.dumps(header.fingerprint.to_json(), sort_keys=True)
    f.attrs["settings"] = json.dumps(header.settings, sort_keys=True)
    f.attrs["branches"] = json.dumps(list(header.branches))
    f.attrs["grid"] = np.asarray(header.grid, dtype=np.int64)
    f.attrs["adapter"] = header.adapter
    f.attrs["cfg_mode"] = header.cfg_mode
    f.attrs["model_flops"] = int(header.model_flops)
    f.attrs["model_seconds"] = float(header.model_seconds)
    for name, (path, dims, dtype, _) in _ROOT_ARRAYS.items():
        dataset = f.create_dataset(path, data=np.asarray(getattr(header, name), dtype=dtype))
        dataset.attrs["dims"] = json.dumps(dims)
    f.create_group("prompts")


def _write_prompt(f: h5py.File, info: PromptInfo, arrays: dict[str, np.ndarray]) -> None:
    group = f["prompts"].create_group(info.key)
    for name, array in arrays.items():
        spec = FIELDS[name]
        data = np.asarray(array, dtype=spec.dtype)
        if data.ndim != len(spec.dims):
            raise ValueError(f"field {name} has {data.ndim} dims, schema says {spec.dims}")
        compress = {"compression": "gzip", "compression_opts": 4, "chunks": True} if data.size >= 1024 else {}
        dataset = group.create_dataset(spec.path, data=data, **compress)
        dataset.attrs["dims"] = json.dumps(spec.dims)
    group.attrs.update(
        {"index": info.index, "prompt": info.prompt, "negative_prompt": info.negative_prompt, "seed": info.seed}
    )
    group.attrs["complete"] = True


# --- the seal ------------------------------------------------------------------------------------------------------


def _content_digest(handle: Any) -> str:
    digest = hashlib.sha256()
    handle.seek(USERBLOCK_BYTES)
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def seal(path: str | os.PathLike) -> None:
    """Write the SHA-256 of everything after the user block into the user block (after any change to the file).

    Refuses a file without the 512-byte user block profiles are created with, rather than overwrite its HDF5 header.
    """
    with open(path, "r+b") as handle:
        head = handle.read(USERBLOCK_BYTES + len(_HDF5_SIGNATURE))
        if head[USERBLOCK_BYTES:] != _HDF5_SIGNATURE:
            raise ProfileError(
                f"{path}: not an HDF5 file with a {USERBLOCK_BYTES}-byte user block; only profiles written by this "
                "version can be sealed"
            )
        stamp = SEAL_MAGIC + _content_digest(handle).encode()
        handle.seek(0)
        handle.write(stamp.ljust(USERBLOCK_BYTES, b"\0"))


def _verify_seal(path: Path) -> None:
    try:
        fd = h5_safe.open_regular(path)
    except UnsafeHdf5 as exc:
        raise ProfileError(f"profile {path} {exc}") from None
    with open(fd, "rb") as handle:
        block = handle.read(USERBLOCK_BYTES)
        if not block.startswith(SEAL_MAGIC):
            raise ProfileError(f"{path}: not a dit-profile file (no profile seal; written by another tool or damaged)")
        expected = block[len(SEAL_MAGIC) : len(SEAL_MAGIC) + 64].decode("ascii", "replace")
        if _content_digest(handle) != expected:
            raise ProfileError(
                f"{path}: profile content does not match its checksum (truncated, damaged or edited); re-profile or "
                "restore it"
            )


# --- reading -------------------------------------------------------------------------------------------------------


class Profile:
    """A read-only view of a profile file: header, prompts, and fields as numpy arrays (range-checked)."""

    def __init__(
        self,
        path: Path,
        header: ProfileHeader,
        prompts: list[PromptInfo],
        shapes: dict[str, dict[str, tuple[int, ...]]],
        limits: Limits,
    ) -> None:
        self.path = path
        self.header = header
        self.prompts = prompts
        self._shapes = shapes  # prompt key -> field -> shape, as checked when the file was opened
        self._limits = limits

    @property
    def block_ids(self) -> tuple[str, ...]:
        return self.header.fingerprint.block_ids

    def has(self, name: str) -> bool:
        """Whether every prompt recorded field `name`."""
        return bool(self.prompts) and all(self.recorded(p, name) for p in self.prompts)

    def recorded(self, prompt: PromptInfo, name: str) -> bool:
        """Whether `prompt` recorded field `name`."""
        return name in self._shapes[prompt.key]

    def read(self, prompt: PromptInfo | int, name: str) -> np.ndarray:
        """Field `name` of one prompt (a `PromptInfo`, or a position in `prompts`)."""
        info = self.prompts[prompt] if isinstance(prompt, int) else prompt
        if not self.recorded(info, name):
            raise ProfileError(f"{self.path}: prompt {info.index} has no '{name}' (re-profile recording it)")
        with self._damage_as_error(), self._open() as f:
            return self._read_field(f, info, name)

    def read_all(self, info: PromptInfo) -> dict[str, np.ndarray]:
        """Every field `info` recorded, read in one opening of the file."""
        with self._damage_as_error(), self._open() as f:
            return {name: self._read_field(f, info, name) for name in FIELDS if self.recorded(info, name)}

    def _read_field(self, f: h5py.File, info: PromptInfo, name: str) -> np.ndarray:
        spec = FIELDS[name]
        node = h5_safe.member(f, "prompts", h5py.Group)
        node = h5_safe.member(node, info.key, h5py.Group)
        *groups, leaf = spec.path.split("/")
        for group in groups:
            node = h5_safe.member(node, group, h5py.Group)
        dataset = h5_safe.member(node, leaf, h5py.Dataset)
        h5_safe.check_dataset(dataset, spec.dtype, len(spec.dims), self._limits)
        if dataset.shape != self._shapes[info.key][name]:
            raise ProfileError(f"{self.path}: {dataset.name} changed shape since the profile was opened")
        values = h5_safe.read_dataset(dataset, self._limits)
        _check_values(values, name, self.header, f"prompt {info.index} field {name}")
        return values

    @contextlib.contextmanager
    def _damage_as_error(self) -> Iterator[None]:
        """h5py reports damaged files with many exception types; all of them become one ProfileError line."""
        try:
            yield
        except ProfileError:
            raise
        except _BadValues as exc:
            raise ProfileError(f"{self.path}: {exc}") from None
        except UnsafeHdf5 as exc:
            raise ProfileError(f"{self.path}: refused: {exc}") from None
        except Exception as exc:
            raise ProfileError(
                f"{self.path}: damaged profile ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
            ) from None

    def stack(self, name: str) -> np.ndarray:
        """Field `name` of every prompt, stacked along a new leading `prompt` axis."""
        if not self.prompts:
            raise ProfileError(f"{self.path}: the profile holds no complete prompt")
        return np.stack([self.read(p, name) for p in self.prompts])

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as exc:
            raise ProfileError(f"{self.path}: cannot open profile ({exc})") from None


class _BadValues(Exception):
    """A field holds values outside what the recorder can produce (one-line message naming the field)."""


def _check_values(values: np.ndarray, name: str, header: ProfileHeader, what: str) -> None:
    """Refuse values no recording holds: outside the field's range, infinite, NaN where NaN means nothing."""
    rule = FIELDS[name].values
    if name == "attention_steps":
        rule = Values(0, int(header.timesteps.shape[0]) - 1)
    elif name == "query_index":
        rule = Values(0, math.prod(header.grid) - 1)
    _check_range(values, what, rule)
    if name == "reuse_gram" and values.size:
        diagonal = np.diagonal(values, axis1=-2, axis2=-1)
        scale = float(np.nanmax(np.abs(values), initial=0.0))
        if np.nanmin(diagonal, initial=0.0) < -COS_SLACK * scale:
            raise _BadValues(f"{what} has negative squared norms on its diagonal")


def _check_range(values: np.ndarray, what: str, rule: Values) -> None:
    if values.dtype.kind == "f":
        nan = np.isnan(values)
        if not rule.nan_means_unrecorded and nan.any():
            raise _BadValues(f"{what} holds NaN, which it never records")
        if np.isinf(values).any():
            raise _BadValues(f"{what} holds infinite values")
        values = values[~nan] if nan.any() else values
    if values.size and (values.min() < rule.low or values.max() > rule.high):
        raise _BadValues(
            f"{what} holds values in [{values.min():.6g}, {values.max():.6g}], outside [{rule.low:g}, {rule.high:g}]"
        )


def _limits(file_bytes: int) -> Limits:
    return Limits(
        file_bytes=file_bytes,
        data_bytes=DATA_EXPANSION * file_bytes + DATA_SLACK_BYTES,
        max_values=MAX_FIELD_VALUES,
        attr_bytes=MAX_ATTR_BYTES,
        json_depth=MAX_JSON_DEPTH,
    )


def open_profile(path: str | os.PathLike) -> Profile:
    """Open and check a profile file; anything wrong raises `ProfileError` with one line."""
    path = Path(path)
    if not path.exists():
        raise ProfileError(f"profile {path} does not exist")
    try:
        limits = _limits(h5_safe.regular_file_size(path))
    except UnsafeHdf5 as exc:
        raise ProfileError(f"profile {path} {exc}") from None
    _verify_seal(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = _read_header_attrs(f, path, limits)
            roots, sizes, root_bytes = _check_root_datasets(f, attrs, limits)
            prompts, shapes = _read_prompts(f, sizes, limits, limits.data_bytes - root_bytes)
            header = ProfileHeader(**attrs, **_read_root_arrays(roots, limits))
    except ProfileError:
        raise
    except (UnsafeHdf5, _BadValues) as exc:
        raise ProfileError(f"{path}: refused: {exc}") from None
    except Exception as exc:  # h5py raises OSError/KeyError/ValueError/RuntimeError for damaged files
        raise ProfileError(
            f"{path}: not a readable profile ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'damaged file'})"
        ) from None
    return Profile(path, header, prompts, shapes, limits)


def _read_header_attrs(f: h5py.File, path: Path, limits: Limits) -> dict[str, Any]:
    """The header's attributes (the root arrays are read once the whole file has been checked)."""
    if h5_safe.read_attr(f, "format", "str", limits, required=False) != FORMAT_NAME:
        raise ProfileError(f"{path}: not a dit-profile file")
    version = h5_safe.read_attr(f, "schema_version", "int", limits, required=False)
    if version != SCHEMA_VERSION:
        raise ProfileError(
            f"{path}: profile schema version {version} is not supported (this version reads {SCHEMA_VERSION}); "
            "re-profile"
        )
    attrs = {
        "fingerprint": _fingerprint(h5_safe.read_json_attr(f, "model_fingerprint", limits)),
        "settings": _json_dict(h5_safe.read_json_attr(f, "settings", limits)),
        "branches": _branches(h5_safe.read_json_attr(f, "branches", limits)),
        "grid": _grid(h5_safe.read_attr(f, "grid", "ints", limits)),
        "adapter": h5_safe.read_attr(f, "adapter", "str", limits),
        "cfg_mode": h5_safe.read_attr(f, "cfg_mode", "str", limits),
        "model_flops": h5_safe.read_attr(f, "model_flops", "int", limits),
        "model_seconds": h5_safe.read_attr(f, "model_seconds", "float", limits),
    }
    _check_range(np.array([attrs["model_flops"], attrs["model_seconds"]], np.float64), "model cost", Values(0.0))
    return attrs


def _check_root_datasets(
    f: h5py.File, attrs: dict[str, Any], limits: Limits
) -> tuple[dict[str, h5py.Dataset], dict[str, int], int]:
    """The root arrays' datasets, checked; the dimension sizes every prompt must agree with; their declared bytes."""
    datasets: dict[str, h5py.Dataset] = {}
    _walk(f, _ROOT_TREE, datasets, skip=frozenset({"prompts"}))
    frames, height, width = attrs["grid"]
    sizes = {
        "branch": len(attrs["branches"]),
        "block": len(attrs["fingerprint"].block_ids),
        "frame": frames,
        "height": height,
        "width": width,
        "rgb": 3,
    }
    total = 0
    for name, (_, dims, dtype, _) in _ROOT_ARRAYS.items():
        if name not in datasets:
            raise UnsafeHdf5(f"the profile lacks its '{name}' array")
        total += _check_field(datasets[name], name, Field("", dims, dtype), sizes, limits)
    if sizes["step"] < 1:
        raise UnsafeHdf5("the profile has no denoising steps")
    return datasets, sizes, total


def _check_field(dataset: h5py.Dataset, name: str, spec: Field, sizes: dict[str, int], limits: Limits) -> int:
    """Refuse a dataset the schema does not allow, or whose sizes disagree with `sizes` (which it extends by the
    dimensions it is the first to use); returns its declared bytes."""
    nbytes = h5_safe.check_dataset(dataset, spec.dtype, len(spec.dims), limits)
    _check_dims_attr(dataset, spec.dims, limits)
    for dim, size in zip(spec.dims, dataset.shape):
        key = f"{name}.{dim}" if (name, dim) in _UNTIED_DIMS else dim
        if sizes.setdefault(key, size) != size:
            raise UnsafeHdf5(f"{dataset.name} has {size} along '{dim}' where the profile has {sizes[key]}")
    return nbytes


def _read_root_arrays(datasets: dict[str, h5py.Dataset], limits: Limits) -> dict[str, np.ndarray]:
    arrays = {}
    for name, (_, _, _, values) in _ROOT_ARRAYS.items():
        arrays[name] = h5_safe.read_dataset(datasets[name], limits)
        _check_range(arrays[name], name, values)
    return arrays


def _walk(
    group: h5py.Group, tree: dict[str, Any], found: dict[str, h5py.Dataset], skip: frozenset = frozenset()
) -> None:
    """Collect the datasets of `tree` under `group`, refusing any name, link or object kind the tree lacks (names in
    `skip` are the caller's to check)."""
    for name in h5_safe.members(group, set(tree) | skip):
        node = tree.get(name)
        if isinstance(node, dict):
            _walk(h5_safe.member(group, name, h5py.Group), node, found)
        elif node is not None:
            found[node] = h5_safe.member(group, name, h5py.Dataset)


def _check_dims_attr(dataset: h5py.Dataset, dims: tuple[str, ...], limits: Limits) -> None:
    stored = h5_safe.read_json_attr(dataset, "dims", limits)
    if stored != list(dims):
        raise UnsafeHdf5(f"{dataset.name} has dims {str(stored)[:80]}, the schema says {list(dims)}")


def _fingerprint(data: Any) -> ModelFingerprint:
    try:
        fingerprint = ModelFingerprint.from_json(data)
    except DitAccelError as exc:
        raise UnsafeHdf5(f"model_fingerprint is malformed ({exc})") from None
    if len(fingerprint.block_ids) > MAX_GRID:
        raise UnsafeHdf5(f"model_fingerprint lists {len(fingerprint.block_ids)} blocks")
    return fingerprint


def _json_dict(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UnsafeHdf5("settings is not a JSON object")
    return data


def _branches(data: Any) -> tuple[str, ...]:
    if not (isinstance(data, list) and 1 <= len(data) <= 2 and all(isinstance(b, str) for b in data)):
        raise UnsafeHdf5("branches is not a list of one or two branch names")
    return tuple(data)


def _grid(values: list[int]) -> tuple[int, int, int]:
    if len(values) != 3 or not all(1 <= v <= MAX_GRID for v in values):
        raise UnsafeHdf5(f"grid {values[:4]} is not three sizes in [1, {MAX_GRID}]")
    return values[0], values[1], values[2]


def _read_prompts(
    f: h5py.File, sizes: dict[str, int], limits: Limits, budget: int
) -> tuple[list[PromptInfo], dict[str, dict[str, tuple[int, ...]]]]:
    """Every complete prompt, and the shape of each field it holds; the whole tree is checked before any read, and
    all datasets together may declare at most `budget` bytes."""
    group = h5_safe.member(f, "prompts", h5py.Group)
    prompts, shapes, total = [], {}, 0
    for key in h5_safe.members(group):
        if not _PROMPT_KEY.fullmatch(key):
            raise UnsafeHdf5(f"/prompts/{key[:40]} is not a prompt group name")
        prompt = h5_safe.member(group, key, h5py.Group)
        datasets: dict[str, h5py.Dataset] = {}
        _walk(prompt, _PROMPT_TREE, datasets)
        own = dict(sizes)
        total += sum(_check_field(d, name, FIELDS[name], own, limits) for name, d in datasets.items())
        if total > budget:
            raise UnsafeHdf5(f"the prompts declare more than {budget} bytes, beyond what this file's size allows")
        shapes[key] = {name: d.shape for name, d in datasets.items()}
        info = _prompt_info(prompt, key, limits)
        if info is not None:
            prompts.append(info)
    return sorted(prompts, key=lambda p: p.index), shapes


def _prompt_info(prompt: h5py.Group, key: str, limits: Limits) -> PromptInfo | None:
    """The prompt's attributes, or None when it is not marked complete."""
    if not h5_safe.read_attr(prompt, "complete", "bool", limits, required=False):
        return None
    index = h5_safe.read_attr(prompt, "index", "int", limits)
    if prompt_key(index) != key:
        raise UnsafeHdf5(f"/prompts/{key} holds prompt index {index}")
    return PromptInfo(
        key,
        index,
        h5_safe.read_attr(prompt, "prompt", "str", limits),
        h5_safe.read_attr(prompt, "negative_prompt", "str", limits),
        h5_safe.read_attr(prompt, "seed", "int", limits),
    )


def iter_prompt_groups(path: str | os.PathLike) -> Iterator[tuple[PromptInfo, dict[str, np.ndarray]]]:
    """Every complete prompt of a profile with all its fields (used to merge shards)."""
    profile = open_profile(path)
    for info in profile.prompts:
        yield info, profile.read_all(info)
