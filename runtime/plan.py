"""The `.plan` format: pure-data plan types, and `save_plan` / `load_plan` for one safetensors file.

A plan is a description of what to skip, never code or weights: loading it parses a safetensors header and JSON,
nothing else. Layout of the file:

* tensors: `actions` (uint8, blocks × steps: 0 compute, 1 reuse, 2 prune), `label_scores` (float32, blocks),
  `timesteps` (float64, steps), `sigmas` (float64, steps, optional) and any named extra array under `arrays/…`
  (PCA bases, blend weights, …);
* metadata key `dit_plan`: JSON with the schema version, model fingerprint, labels, spans, policy, provenance and
  predicted metrics; metadata key `content_sha256`: a checksum over both, so a tampered file is refused.

The same `Plan` always serialises to the same bytes.

Example:
    >>> plan = Plan.all_compute(fingerprint, timesteps=[999.0, 500.0, 1.0])
    >>> save_plan(plan, "model.plan")
    >>> load_plan("model.plan") == plan
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PlanError

SCHEMA_VERSION = 1
FORMAT_NAME = "dit-plan"
COMPUTE, REUSE, PRUNE = 0, 1, 2
ACTION_NAMES = {COMPUTE: "compute", REUSE: "reuse", PRUNE: "prune"}
LABELS = ("foreground", "background", "unlabelled")
MAX_PLAN_BYTES = 2 << 30
_REQUIRED_KEYS = ("schema_version", "model", "num_inference_steps", "labels", "spans", "policy", "provenance", "predicted")


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the transformer a plan was fitted on: class name, config hash and ordered block ids."""

    transformer_class: str
    config_hash: str
    block_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"transformer_class": self.transformer_class, "config_hash": self.config_hash, "block_ids": list(self.block_ids)}

    @classmethod
    def from_json(cls, data: Any) -> "ModelFingerprint":
        _expect(isinstance(data, dict), "field 'model' must be an object")
        for key in ("transformer_class", "config_hash", "block_ids"):
            _expect(key in data, f"field 'model.{key}' is missing")
        ids = data["block_ids"]
        _expect(isinstance(ids, list) and ids and all(isinstance(b, str) for b in ids), "field 'model.block_ids' must be a non-empty list of strings")
        _expect(len(set(ids)) == len(ids), "field 'model.block_ids' has duplicate block ids")
        _expect(isinstance(data["transformer_class"], str) and isinstance(data["config_hash"], str), "fields 'model.transformer_class' and 'model.config_hash' must be strings")
        return cls(data["transformer_class"], data["config_hash"], tuple(ids))


@dataclass(frozen=True, eq=False)
class Plan:
    """A fitted acceleration plan for one model and one step grid.

    `actions[b, s]` is what block `b` does at denoising step `s`. `spans` lists half-open block ranges that are
    cached as one tensor (each block belongs to at most one span; blocks outside spans are cached alone).
    `arrays` holds extra named tensors (PCA bases, blend weights) whose meaning the `policy` describes.
    """

    model: ModelFingerprint
    timesteps: np.ndarray
    actions: np.ndarray
    sigmas: np.ndarray | None = None
    labels: tuple[str, ...] = ()
    label_scores: np.ndarray | None = None
    spans: tuple[tuple[int, int], ...] = ()
    policy: dict[str, Any] = field(default_factory=lambda: {"kind": "static"})
    provenance: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        blocks = len(self.model.block_ids)
        object.__setattr__(self, "timesteps", np.asarray(self.timesteps, dtype=np.float64))
        object.__setattr__(self, "actions", np.asarray(self.actions, dtype=np.uint8))
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", np.asarray(self.sigmas, dtype=np.float64))
        if not self.labels:
            object.__setattr__(self, "labels", ("unlabelled",) * blocks)
        if self.label_scores is None:
            object.__setattr__(self, "label_scores", np.zeros(blocks, dtype=np.float32))
        object.__setattr__(self, "label_scores", np.asarray(self.label_scores, dtype=np.float32))
        object.__setattr__(self, "spans", tuple((int(a), int(b)) for a, b in self.spans))
        validate_plan(self)

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def num_blocks(self) -> int:
        return len(self.model.block_ids)

    @classmethod
    def all_compute(cls, model: ModelFingerprint, timesteps: Any, **kwargs: Any) -> "Plan":
        """A plan that computes every block at every step (replays bit-identically to no plan)."""
        steps = len(np.asarray(timesteps))
        return cls(model=model, timesteps=timesteps, actions=np.zeros((len(model.block_ids), steps), np.uint8), **kwargs)

    def with_changes(self, **changes: Any) -> "Plan":
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    def compute_fraction(self) -> float:
        """Share of block calls the plan computes in full (prune counts as computed)."""
        return float(np.mean(self.actions != REUSE))

    def span_of_block(self) -> list[tuple[int, int]]:
        """For every block, the span it is cached in: its declared span, or itself alone."""
        owner = [(b, b + 1) for b in range(self.num_blocks)]
        for start, stop in self.spans:
            for b in range(start, stop):
                owner[b] = (start, stop)
        return owner

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.content_hash() == other.content_hash()

    def __hash__(self) -> int:
        return hash(self.content_hash())

    def content_hash(self) -> str:
        """SHA-256 over everything the plan says: equal plans have equal hashes and serialise identically."""
        return _checksum(*_canonical(self))


def validate_plan(plan: Plan) -> None:
    """Refuse a plan that is internally inconsistent; every message names the offending field."""
    _expect(plan.schema_version == SCHEMA_VERSION, f"unsupported plan schema version {plan.schema_version} (this runtime reads version {SCHEMA_VERSION}); refit the plan with this version of dit-plan")
    blocks, steps = plan.num_blocks, plan.timesteps.shape[0] if plan.timesteps.ndim == 1 else -1
    _expect(plan.timesteps.ndim == 1 and steps >= 1, "field 'timesteps' must be a non-empty 1-D array")
    _expect(plan.actions.shape == (blocks, steps), f"field 'actions' has shape {tuple(plan.actions.shape)}, expected (blocks={blocks}, steps={steps})")
    _expect(bool(np.all(plan.actions <= PRUNE)), "field 'actions' holds an unknown action code (known: 0 compute, 1 reuse, 2 prune)")
    _expect(bool(np.all(np.isfinite(plan.timesteps))), "field 'timesteps' holds non-finite numbers")
    if plan.sigmas is not None:
        _expect(plan.sigmas.shape == (steps,), f"field 'sigmas' has shape {tuple(plan.sigmas.shape)}, expected ({steps},)")
        _expect(bool(np.all(np.isfinite(plan.sigmas))), "field 'sigmas' holds non-finite numbers")
    _expect(len(plan.labels) == blocks and all(l in LABELS for l in plan.labels), f"field 'labels' must name one of {LABELS} for each of the {blocks} blocks")
    _expect(plan.label_scores.shape == (blocks,), f"field 'label_scores' has shape {tuple(plan.label_scores.shape)}, expected ({blocks},)")
    _expect(bool(np.all(np.isfinite(plan.label_scores))), "field 'label_scores' holds non-finite numbers")
    _validate_spans(plan.spans, plan.actions)
    _validate_reuse_has_source(plan)
    _expect(isinstance(plan.policy, dict) and isinstance(plan.policy.get("kind"), str), "field 'policy' must be an object with a string 'kind'")
    for key in ("provenance", "predicted"):
        _expect(isinstance(getattr(plan, key), dict), f"field '{key}' must be an object")
        _expect(_all_finite(getattr(plan, key)), f"field '{key}' holds non-finite numbers")
    _expect(_all_finite(plan.policy), "field 'policy' holds non-finite numbers")
    for name, array in plan.arrays.items():
        _expect(isinstance(name, str) and name and "/" not in name[:1], f"extra array name {name!r} is not a valid name")
        _expect(isinstance(array, np.ndarray), f"extra array '{name}' is not an array")
        _expect(array.dtype.kind not in "fc" or bool(np.all(np.isfinite(array))), f"extra array '{name}' holds non-finite numbers")


def _validate_spans(spans: tuple[tuple[int, int], ...], actions: np.ndarray) -> None:
    seen = np.zeros(actions.shape[0], dtype=bool)
    for start, stop in spans:
        _expect(0 <= start < stop <= actions.shape[0], f"span [{start}, {stop}) is outside the {actions.shape[0]} blocks")
        _expect(not seen[start:stop].any(), f"span [{start}, {stop}) overlaps another span")
        seen[start:stop] = True
        rows = actions[start:stop] == REUSE
        _expect(bool(np.all(rows == rows[0])), f"span [{start}, {stop}) groups blocks whose reuse steps differ")


def _validate_reuse_has_source(plan: Plan) -> None:
    for block, row in enumerate(plan.actions):
        reused = np.flatnonzero(row == REUSE)
        if reused.size:
            computed = np.flatnonzero(row != REUSE)
            _expect(computed.size > 0 and computed[0] < reused[0], f"block {plan.model.block_ids[block]} is reused at step {reused[0]} before it is ever computed")


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)


def _canonical(plan: Plan) -> tuple[str, dict[str, np.ndarray]]:
    """The plan as (canonical JSON text, named tensors): what the file stores and the checksum covers."""
    meta = {
        "format": FORMAT_NAME,
        "schema_version": plan.schema_version,
        "model": plan.model.to_json(),
        "num_inference_steps": plan.num_inference_steps,
        "labels": list(plan.labels),
        "spans": [list(s) for s in plan.spans],
        "policy": plan.policy,
        "provenance": plan.provenance,
        "predicted": plan.predicted,
        "arrays": sorted(plan.arrays),
    }
    tensors = {"actions": plan.actions, "label_scores": plan.label_scores, "timesteps": plan.timesteps}
    if plan.sigmas is not None:
        tensors["sigmas"] = plan.sigmas
    tensors.update({f"arrays/{name}": np.ascontiguousarray(a) for name, a in plan.arrays.items()})
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text, tensors


def _checksum(text: str, tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


_SAFETENSORS_DTYPES = {"uint8": "U8", "float32": "F32", "float64": "F64", "float16": "F16", "int32": "I32", "int64": "I64", "int8": "I8", "int16": "I16", "bool": "BOOL"}


def plan_to_bytes(plan: Plan) -> bytes:
    """Serialise a plan to the bytes of a `.plan` file.

    The safetensors container is laid out here rather than by `safetensors.save`, which writes metadata keys in hash
    order: tensors sorted by name, header JSON with sorted keys, padded to 8 bytes, so equal plans give equal bytes.
    """
    try:
        text, tensors = _canonical(plan)
    except ValueError as exc:
        raise PlanError(f"plan metadata cannot be written as JSON: {exc}") from None
    header: dict[str, Any] = {"__metadata__": {"content_sha256": _checksum(text, tensors), "dit_plan": text}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = _SAFETENSORS_DTYPES.get(array.dtype.name)
        if dtype is None:
            raise PlanError(f"plan array '{name}' has dtype {array.dtype}, which a plan cannot store")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write `plan` to `path` atomically (temporary file, then rename), so no partial plan is ever left behind."""
    path = Path(path)
    data = plan_to_bytes(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        make_world_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def make_world_readable(path: str | os.PathLike) -> None:
    """Give a file made by `mkstemp` (mode 0600) the mode a plain `open()` would have given it under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a `.plan` file; anything that is not a valid plan raises `PlanError` with one line."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PlanError(f"cannot read plan file {path}: {exc.strerror or exc}") from None
    if size > MAX_PLAN_BYTES:
        raise PlanError(f"{path} is {size} bytes, larger than any plan ({MAX_PLAN_BYTES} bytes at most)")
    return plan_from_bytes(path.read_bytes(), source=str(path))


def plan_from_bytes(data: bytes, source: str = "<bytes>") -> Plan:
    """Parse the bytes of a `.plan` file (see `load_plan`)."""
    text, tensors = _read_container(data, source)
    try:
        meta = json.loads(text)
    except ValueError:
        raise PlanError(f"{source}: plan metadata is not valid JSON") from None
    _expect(isinstance(meta, dict) and meta.get("format") == FORMAT_NAME, f"{source}: not a dit-plan file (metadata has no format '{FORMAT_NAME}')")
    version = meta.get("schema_version")
    _expect(version == SCHEMA_VERSION, f"{source}: unsupported plan schema version {version!r} (this runtime reads version {SCHEMA_VERSION}); refit the plan with this version of dit-plan")
    for key in _REQUIRED_KEYS:
        _expect(key in meta, f"{source}: plan metadata is missing field '{key}'")
    for key in ("actions", "label_scores", "timesteps"):
        _expect(key in tensors, f"{source}: plan is missing tensor '{key}'")
    names = meta.get("arrays", [])
    _expect(isinstance(names, list) and all(f"arrays/{n}" in tensors for n in names), f"{source}: plan lists extra arrays that it does not contain")
    _expect(len(tensors) == 3 + ("sigmas" in tensors) + len(names), f"{source}: plan holds tensors that its metadata does not declare")
    _expect(isinstance(meta["spans"], list) and all(isinstance(s, list) and len(s) == 2 and all(isinstance(i, int) for i in s) for s in meta["spans"]), f"{source}: field 'spans' must be a list of [start, stop] pairs")
    _expect(isinstance(meta["labels"], list), f"{source}: field 'labels' must be a list")
    _expect(_dtype_ok(tensors, "actions", "u") and _dtype_ok(tensors, "label_scores", "f") and _dtype_ok(tensors, "timesteps", "f"), f"{source}: a plan tensor has the wrong dtype")
    try:
        plan = Plan(
            model=ModelFingerprint.from_json(meta["model"]),
            timesteps=tensors["timesteps"],
            sigmas=tensors.get("sigmas"),
            actions=tensors["actions"],
            labels=tuple(meta["labels"]),
            label_scores=tensors["label_scores"],
            spans=tuple(tuple(s) for s in meta["spans"]),
            policy=meta["policy"],
            provenance=meta["provenance"],
            predicted=meta["predicted"],
            arrays={n: tensors[f"arrays/{n}"] for n in names},
            schema_version=version,
        )
    except PlanError as exc:
        raise PlanError(f"{source}: {exc}") from None
    _expect(plan.num_inference_steps == meta["num_inference_steps"], f"{source}: field 'num_inference_steps' disagrees with the timestep grid")
    return plan


def _dtype_ok(tensors: dict[str, np.ndarray], name: str, kind: str) -> bool:
    return tensors[name].dtype.kind == kind


def _read_container(data: bytes, source: str) -> tuple[str, dict[str, np.ndarray]]:
    """Parse the safetensors container and verify its checksum; never unpickles anything."""
    from safetensors.numpy import load

    if len(data) < 8:
        raise PlanError(f"{source}: not a dit-plan file (too short to be a safetensors container)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > 100 << 20:
        raise PlanError(f"{source}: not a dit-plan file (no valid safetensors header; a pickle or archive renamed .plan?)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types; all mean "not a valid container"
        raise PlanError(f"{source}: not a dit-plan file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'invalid container'})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or "dit_plan" not in meta:
        raise PlanError(f"{source}: not a dit-plan file (no 'dit_plan' metadata)")
    text = meta["dit_plan"]
    if meta.get("content_sha256") != _checksum(text, tensors):
        raise PlanError(f"{source}: plan content does not match its checksum (the file was modified or corrupted); refit or re-download it")
    return text, tensors
