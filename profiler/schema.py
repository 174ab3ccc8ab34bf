"""The profile HDF5 schema: the only module that knows where anything lives in a profile file.

A profile holds one profiling run (or merged shards of several). Writers call `ProfileWriter`; readers call
`open_profile`, which returns numpy arrays by field name. Every dataset carries its dimension names in a `dims`
attribute; the root carries the schema version and the model fingerprint. See docs/profile-format.md.

Integrity: every profile starts with a 512-byte HDF5 user block (which HDF5 ignores) holding a magic string and
the SHA-256 of the rest of the file. `open_profile` verifies it before the HDF5 library parses anything, so a
truncated, bit-flipped or edited file is refused with a message instead of reaching HDF5's C parser (which can
hang on some corruptions).

Crash safety: `ProfileWriter.add_prompt` never modifies the file in place. It copies the current file to a
temporary file beside it, appends the prompt there, and renames it over the original, so a run killed at any moment
leaves the last complete file (losing at most the prompt in progress).

Example:
    >>> profile = open_profile("wan.h5")
    >>> drift = profile.stack("residual_rel_l1")     # (prompt, branch, step, block)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dit_accel.harness.errors import DitAccelError
from dit_accel.harness.files import atomic_path
from dit_accel.runtime.plan import ModelFingerprint

SCHEMA_VERSION = 1
FORMAT_NAME = "dit-profile"
USERBLOCK_BYTES = 512
SEAL_MAGIC = b"DIT-PROFILE-SHA256:"
MAX_FIELD_VALUES = (
    1 << 28
)  # 268 M values per field: 10x Wan-1.3B's largest field, a stated bound on what a read allocates


class ProfileError(DitAccelError):
    """A profile file is missing, corrupt, of another schema, or lacks what a consumer needs."""


@dataclass(frozen=True)
class Field:
    """One per-prompt dataset: its path inside the prompt's group, dimension names, and storage dtype."""

    path: str
    dims: tuple[str, ...]
    dtype: str


# Per-prompt fields. Branch order is the file's `branches` attribute; steps and blocks follow the root grids.
FIELDS: dict[str, Field] = {
    "residual_rel_l1": Field("drift/residual_rel_l1", ("branch", "step", "block"), "float32"),
    "residual_cos": Field("drift/residual_cos", ("branch", "step", "block"), "float32"),
    "output_rel_l1": Field("drift/output_rel_l1", ("branch", "step", "block"), "float32"),
    "output_cos": Field("drift/output_cos", ("branch", "step", "block"), "float32"),
    "residual_norm": Field("norms/residual", ("branch", "step", "block"), "float32"),
    "output_norm": Field("norms/output", ("branch", "step", "block"), "float32"),
    "model_output_rel_l1": Field("model_output/rel_l1", ("branch", "step"), "float32"),
    "motion": Field("motion", ("branch", "step", "block"), "float32"),
    "attention_steps": Field("attention/steps", ("attention_step",), "int32"),
    "attention_received": Field(
        "attention/received", ("attention_step", "block", "frame", "height", "width"), "float16"
    ),
    "query_index": Field("attention/query_index", ("query",), "int32"),
    "cross_attention": Field("attention/cross", ("attention_step", "block", "query", "text_token"), "float16"),
    "foreground": Field("foreground", ("frame", "height", "width"), "uint8"),
    "feature_queries": Field("features/queries", ("block", "sample", "head", "channel"), "float16"),
    "feature_keys": Field("features/keys", ("block", "sample", "head", "channel"), "float16"),
    "video": Field("video", ("frame", "pixel_height", "pixel_width", "rgb"), "uint8"),
    "step_sensitivity": Field("sensitivity/final_error", ("step",), "float32"),
    "reuse_gram": Field("reuse/gram", ("branch", "step", "lag", "lag"), "float32"),
    "stack_output_sq": Field("reuse/stack_output_sq", ("branch", "step"), "float32"),
}
_ROOT_ARRAYS = {
    "timesteps": ("timesteps", ("step",), "float64"),
    "sigmas": ("sigmas", ("step",), "float64"),
    "block_flops": ("cost/flops", ("block",), "int64"),
    "block_seconds": ("cost/seconds", ("block",), "float64"),
}


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


class ProfileWriter:
    """Creates a profile file and appends complete prompts to it atomically."""

    def __init__(self, path: str | os.PathLike, header: ProfileHeader | None) -> None:
        """Writer for `path`; creates the file with `header` unless it exists (then `header` may be None)."""
        self.path = Path(path)
        self.header = header
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a run killed during an atomic write
        if not self.path.exists():
            if header is None:
                raise ProfileError(f"{self.path} does not exist and no header was given to create it")
            self._atomic(lambda f: _write_header(f, header), copy=False)

    def add_prompt(self, info: PromptInfo, arrays: dict[str, np.ndarray]) -> None:
        """Append one complete prompt (fields by `FIELDS` name); the file is replaced atomically."""
        self.add_prompts([(info, arrays)])

    def add_prompts(self, prompts: list[tuple[PromptInfo, dict[str, np.ndarray]]]) -> None:
        """Append several complete prompts in one atomic replacement of the file."""
        for _, arrays in prompts:
            unknown = set(arrays) - set(FIELDS)
            if unknown:
                raise ValueError(f"unknown profile fields: {sorted(unknown)}")

        def write(f: h5py.File) -> None:
            for info, arrays in prompts:
                _write_prompt(f, info, arrays)

        self._atomic(write, copy=True)

    def _atomic(self, write, copy: bool) -> None:
        with atomic_path(self.path) as tmp:
            if copy:
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") if copy else h5py.File(tmp, "w", userblock_size=USERBLOCK_BYTES) as handle:
                write(handle)
            seal(tmp)


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
    for name, (path, dims, dtype) in _ROOT_ARRAYS.items():
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


def _content_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(USERBLOCK_BYTES)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def seal(path: str | os.PathLike) -> None:
    """Write the SHA-256 of everything after the user block into the user block (after any change to the file).

    Refuses a file without the 512-byte user block profiles are created with, rather than overwrite its HDF5 header.
    """
    with open(path, "rb") as handle:
        head = handle.read(USERBLOCK_BYTES + len(_HDF5_SIGNATURE))
    if head[USERBLOCK_BYTES:] != _HDF5_SIGNATURE:
        raise ProfileError(
            f"{path}: not an HDF5 file with a {USERBLOCK_BYTES}-byte user block; only profiles written by this "
            "version can be sealed"
        )
    stamp = SEAL_MAGIC + _content_digest(path).encode()
    with open(path, "r+b") as handle:
        handle.write(stamp.ljust(USERBLOCK_BYTES, b"\0"))


def _verify_seal(path: Path) -> None:
    with open(path, "rb") as handle:
        block = handle.read(USERBLOCK_BYTES)
    if not block.startswith(SEAL_MAGIC):
        raise ProfileError(f"{path}: not a dit-profile file (no profile seal; written by another tool or damaged)")
    expected = block[len(SEAL_MAGIC) : len(SEAL_MAGIC) + 64].decode("ascii", "replace")
    if _content_digest(path) != expected:
        raise ProfileError(
            f"{path}: profile content does not match its checksum (truncated, damaged or edited); re-profile or "
            "restore it"
        )


def prompt_key(index: int) -> str:
    return f"p{index:05d}"


class Profile:
    """A read-only view of a profile file: header, prompts, and fields as numpy arrays."""

    def __init__(self, path: Path, header: ProfileHeader, prompts: list[PromptInfo]) -> None:
        self.path = path
        self.header = header
        self.prompts = prompts

    @property
    def block_ids(self) -> tuple[str, ...]:
        return self.header.fingerprint.block_ids

    def has(self, name: str) -> bool:
        """Whether every prompt recorded field `name`."""
        with self._damage_as_error(), self._open() as f:
            return bool(self.prompts) and all(FIELDS[name].path in f["prompts"][p.key] for p in self.prompts)

    def recorded(self, prompt: PromptInfo, name: str) -> bool:
        """Whether `prompt` recorded field `name`."""
        with self._damage_as_error(), self._open() as f:
            return FIELDS[name].path in f["prompts"][prompt.key]

    def read(self, prompt: PromptInfo | int, name: str) -> np.ndarray:
        """Field `name` of one prompt (a `PromptInfo`, or a position in `prompts`)."""
        info = self.prompts[prompt] if isinstance(prompt, int) else prompt
        with self._damage_as_error(), self._open() as f:
            group = f["prompts"][info.key]
            if FIELDS[name].path not in group:
                raise ProfileError(f"{self.path}: prompt {info.index} has no '{name}' (re-profile recording it)")
            return _read_dataset(group[FIELDS[name].path], self.path)

    @contextlib.contextmanager
    def _damage_as_error(self) -> Iterator[None]:
        """h5py reports damaged files with many exception types; all of them become one ProfileError line."""
        try:
            yield
        except ProfileError:
            raise
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


def _read_dataset(dataset: h5py.Dataset, path: Path) -> np.ndarray:
    """A dataset's values, refusing declared sizes beyond any real profile field before reading."""
    if dataset.size > MAX_FIELD_VALUES:
        raise ProfileError(
            f"{path}: dataset {dataset.name} declares {dataset.size} values, more than any profile field"
        )
    return dataset[()]


def open_profile(path: str | os.PathLike) -> Profile:
    """Open and check a profile file; anything wrong raises `ProfileError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {path} does not exist")
    _verify_seal(path)
    try:
        with h5py.File(path, "r") as f:
            header = _read_header(f, path)
            prompts = _read_prompts(f)
    except ProfileError:
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/ValueError/RuntimeError for damaged files
        raise ProfileError(
            f"{path}: not a readable profile ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'damaged file'})"
        ) from None
    return Profile(path, header, prompts)


def _read_header(f: h5py.File, path: Path) -> ProfileHeader:
    if f.attrs.get("format") != FORMAT_NAME:
        raise ProfileError(f"{path}: not a dit-profile file")
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise ProfileError(
            f"{path}: profile schema version {version} is not supported (this version reads {SCHEMA_VERSION}); "
            "re-profile"
        )
    arrays = {name: np.asarray(f[p][()], dtype=dtype) for name, (p, _, dtype) in _ROOT_ARRAYS.items()}
    fingerprint = ModelFingerprint.from_json(json.loads(f.attrs["model_fingerprint"]))
    header = ProfileHeader(
        fingerprint=fingerprint,
        settings=json.loads(f.attrs["settings"]),
        branches=tuple(json.loads(f.attrs["branches"])),
        grid=tuple(int(x) for x in f.attrs["grid"]),
        adapter=str(f.attrs["adapter"]),
        cfg_mode=str(f.attrs["cfg_mode"]),
        model_flops=int(f.attrs["model_flops"]),
        model_seconds=float(f.attrs["model_seconds"]),
        **arrays,
    )
    steps, blocks = header.timesteps.shape[0], len(fingerprint.block_ids)
    if (
        header.sigmas.shape != (steps,)
        or header.block_flops.shape != (blocks,)
        or header.block_seconds.shape != (blocks,)
    ):
        raise ProfileError(f"{path}: profile header arrays do not match its {steps} steps and {blocks} blocks")
    return header


def _read_prompts(f: h5py.File) -> list[PromptInfo]:
    prompts = []
    for key in sorted(f["prompts"]):
        attrs = f["prompts"][key].attrs
        if attrs.get("complete"):
            prompts.append(
                PromptInfo(
                    key, int(attrs["index"]), str(attrs["prompt"]), str(attrs["negative_prompt"]), int(attrs["seed"])
                )
            )
    return sorted(prompts, key=lambda p: p.index)


def iter_prompt_groups(path: str | os.PathLike) -> Iterator[tuple[PromptInfo, dict[str, np.ndarray]]]:
    """Every complete prompt of a profile with all its fields (used to merge shards)."""
    profile = open_profile(path)
    for info in profile.prompts:
        with profile._damage_as_error(), profile._open() as f:
            group = f["prompts"][info.key]
            arrays = {
                name: _read_dataset(group[spec.path], profile.path)
                for name, spec in FIELDS.items()
                if spec.path in group
            }
        yield info, arrays
