"""The `.plan` format: pure-data plan types, and `save_plan` / `load_plan` for one safetensors file.

A plan is a description of what to skip, never code or weights: loading it parses a safetensors header and JSON,
nothing else. Layout of the file:

* tensors: `actions` (uint8, blocks × steps: 0 compute, 1 reuse, 2 prune), `label_scores` (float32, blocks),
  `timesteps` (float64, steps), `sigmas` (float64, steps, optional) and any named extra array under `arrays/…`
  (PCA bases, blend weights, …);
* metadata key `dit_plan`: JSON with the schema version, model fingerprint, labels, spans, policy, provenance and
  predicted metrics; metadata key `content_sha256`: a checksum over both, so a damaged file is refused; optional
  metadata key `content_hmac_sha256`: an HMAC-SHA256 of that checksum under a secret key (`save_plan(…, key=…)`),
  so a plan edited by someone without the key is refused by `load_plan(…, key=…)`.

Loading is bounded: only regular files are read, every size and count is checked against fixed limits (the
`MAX_*` constants) before anything is allocated for it, JSON nesting is measured before it is parsed, every field
is type-checked, and the claims in `predicted` that the schedule determines are recomputed (`check_claims`).
docs/reliability.md states the resulting memory bound.

The same `Plan` always serialises to the same bytes.

Example:
    >>> plan = Plan.all_compute(fingerprint, timesteps=[999.0, 500.0, 1.0])
    >>> save_plan(plan, "model.plan")
    >>> load_plan("model.plan") == plan
    True
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import numbers
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dit_accel.harness.files import write_bytes_atomic

from .errors import PlanError

SCHEMA_VERSION = 1
FORMAT_NAME = "dit-plan"
COMPUTE, REUSE, PRUNE = 0, 1, 2
ACTION_NAMES = {COMPUTE: "compute", REUSE: "reuse", PRUNE: "prune"}
LABELS = ("foreground", "background", "unlabelled")
#: What a reuse cell of a static plan replays (policy key `cache_level`, absent: "block"): the block's residual, or,
#: with "attention", the block runs and only its self-attention returns the output cached at its last computed step.
CACHE_LEVELS = ("block", "attention")
#: Largest plan file read, in bytes.
MAX_PLAN_BYTES = 2 << 30
#: Largest safetensors header (the JSON before the tensor data), in bytes.
MAX_HEADER_BYTES = 32 << 20
#: Largest `dit_plan` metadata text, in characters.
MAX_METADATA_CHARS = 8 << 20
#: Deepest nesting of objects and lists in the header or the metadata.
MAX_JSON_DEPTH = 16
#: Most JSON values (counted as separators and opening brackets) in the header or the metadata.
MAX_JSON_VALUES = 1 << 16
MAX_TENSORS = 4096
MAX_TENSOR_RANK = 8
MAX_BLOCKS = 1024
MAX_STEPS = 10_000
#: Most schedule cells (blocks × steps): the runtime prepares a few Python objects per cell and run length.
MAX_CELLS = 1 << 20
MAX_CODEBOOK = 256
MAX_NAME_CHARS = 1024
#: Sampled weight values a model fingerprint may hold.
MAX_WEIGHT_SAMPLES = 4096
#: Further experts (beyond `transformer`) a model fingerprint may list.
MAX_EXPERTS = 8
MAX_PATH_CHARS = 4096
#: Largest `size_*` entry of the profile settings (`dit-plan validate` generates at that size) and their product.
MAX_VIDEO_SIDE = 16_384
MAX_VIDEO_VALUES = 1 << 28
#: Largest MoReg exponent, and the bound on exponent · ln(1 / norm) that keeps (motion / norm)^exponent finite.
MAX_MOREG_EXPONENT = 64.0
MAX_MOREG_LOG_SCALE = 700.0
#: Longest step count a policy may name (protected steps, reuse runs, refresh period): twice the longest plan.
MAX_POLICY_STEPS = 2 * MAX_STEPS
#: Tolerance of a recomputed claim: relative for the speedup, absolute for the compute fraction.
CLAIM_TOLERANCE = 1e-5
SIGNATURE_KEY = "content_hmac_sha256"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
_REQUIRED_KEYS = (
    "schema_version",
    "model",
    "num_inference_steps",
    "labels",
    "spans",
    "policy",
    "provenance",
    "predicted",
)
_ADAPTIVE_KINDS = ("adacache", "bwcache")


@dataclass(frozen=True)
class ExpertFingerprint:
    """Identity of one further expert of a multi-transformer pipeline (Wan 2.2's `transformer_2`).

    `name` is the pipeline attribute holding it. `weights` compares with a tolerance, as in `ModelFingerprint`.
    `first_step` is the first denoising step it served in the profiled run (a profile or plan records it; a
    fingerprint taken from a live pipeline does not know it): not part of equality, since it belongs to the run,
    not to the model.
    """

    name: str
    transformer_class: str
    config_hash: str
    weights: tuple[float, ...] | None = field(default=None, compare=False)
    first_step: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "transformer_class": self.transformer_class,
            "config_hash": self.config_hash,
        }
        if self.weights is not None:
            data["weights"] = list(self.weights)
        if self.first_step is not None:
            data["first_step"] = self.first_step
        return data

    @classmethod
    def from_json(cls, data: Any) -> ExpertFingerprint:
        """Read one entry of `model.experts`; raises PlanError naming the problem."""
        _expect(
            isinstance(data, dict) and all(_is_name(data.get(k)) for k in ("name", "transformer_class", "config_hash")),
            "every entry of field 'model.experts' must be an object with string 'name', 'transformer_class' and "
            "'config_hash'",
        )
        weights, first = data.get("weights"), data.get("first_step")
        _check_weight_samples(weights, list)
        _expect(
            first is None or (_is_int(first) and 1 <= first < MAX_STEPS),
            f"field 'model.experts[].first_step' must be an integer in [1, {MAX_STEPS})",
        )
        return cls(
            data["name"],
            data["transformer_class"],
            data["config_hash"],
            None if weights is None else tuple(float(w) for w in weights),
            None if first is None else int(first),
        )


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the transformer a plan was fitted on: class name, config hash and ordered block ids.

    `weights` (optional; plans written before it existed lack it) is a sample of weight values at fixed positions
    (`dit_accel.runtime.adapters.weights_sample`): not part of equality, since the same architecture loaded in
    another dtype samples slightly different values; `apply_plan` compares it with a tolerance.

    `experts` lists the further experts of a multi-transformer pipeline (Wan 2.2: `transformer_2`), which share
    these block ids; the fields above then describe the first expert, the pipeline's `transformer`. Empty for a
    single transformer (and absent from its JSON, so such plans serialise as before).
    """

    transformer_class: str
    config_hash: str
    block_ids: tuple[str, ...]
    weights: tuple[float, ...] | None = field(default=None, compare=False)
    experts: tuple[ExpertFingerprint, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "transformer_class": self.transformer_class,
            "config_hash": self.config_hash,
            "block_ids": list(self.block_ids),
        }
        if self.weights is not None:
            data["weights"] = list(self.weights)
        if self.experts:
            data["experts"] = [e.to_json() for e in self.experts]
        return data

    @property
    def expert_names(self) -> tuple[str, ...]:
        """The pipeline attributes of every expert, in serving order: `("transformer",)` for one transformer."""
        return ("transformer", *(e.name for e in self.experts))

    def expert_starts(self, steps: int) -> np.ndarray:
        """Boolean [steps]: the steps at which a further expert serves its first step (none for one transformer)."""
        starts = np.zeros(steps, dtype=bool)
        starts[[e.first_step for e in self.experts if e.first_step is not None and e.first_step < steps]] = True
        return starts

    @classmethod
    def from_json(cls, data: Any) -> ModelFingerprint:
        """Read the `model` field of a plan's metadata.

        Raises:
            PlanError: a key is missing or has the wrong type.
        """
        _expect(isinstance(data, dict), "field 'model' must be an object")
        for key in ("transformer_class", "config_hash", "block_ids"):
            _expect(key in data, f"field 'model.{key}' is missing")
        ids = data["block_ids"]
        _expect(
            isinstance(ids, list) and ids and all(isinstance(b, str) for b in ids),
            "field 'model.block_ids' must be a non-empty list of strings",
        )
        _expect(
            isinstance(data["transformer_class"], str) and isinstance(data["config_hash"], str),
            "fields 'model.transformer_class' and 'model.config_hash' must be strings",
        )
        weights = data.get("weights")
        _check_weight_samples(weights, list)
        experts = data.get("experts", [])
        _expect(
            isinstance(experts, list) and len(experts) <= MAX_EXPERTS,
            f"field 'model.experts' must be a list of at most {MAX_EXPERTS} experts",
        )
        return cls(
            data["transformer_class"],
            data["config_hash"],
            tuple(ids),
            None if weights is None else tuple(float(w) for w in weights),
            tuple(ExpertFingerprint.from_json(e) for e in experts),
        )


@dataclass(frozen=True, eq=False)
class Plan:
    """A fitted acceleration plan for one model and one step grid.

    `actions[b, s]` is what block `b` does at denoising step `s`. `spans` lists half-open block ranges that are
    cached as one tensor (each block belongs to at most one span; blocks outside spans are cached alone).
    `arrays` holds extra named tensors (PCA bases, blend weights) whose meaning the `policy` describes.
    `policy`, `provenance` and `predicted` are validated at construction and read-only afterwards (use
    `with_changes`), so a plan that passed the checks cannot be edited into one the runtime would fail on.
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
        _expect(
            all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(i) and 0 <= i <= MAX_BLOCKS for i in s)
                for s in self.spans
            ),
            f"field 'spans' must be a list of [start, stop] pairs of integers in [0, {MAX_BLOCKS}]",
        )
        object.__setattr__(self, "spans", tuple((int(a), int(b)) for a, b in self.spans))
        check_consistency(self)
        for name in ("policy", "provenance", "predicted"):
            object.__setattr__(self, name, _read_only(getattr(self, name)))

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def num_blocks(self) -> int:
        return len(self.model.block_ids)

    @classmethod
    def all_compute(cls, model: ModelFingerprint, timesteps: Any, **kwargs: Any) -> Plan:
        """A plan that computes every block at every step (replays bit-identically to no plan)."""
        steps = len(np.asarray(timesteps))
        return cls(
            model=model, timesteps=timesteps, actions=np.zeros((len(model.block_ids), steps), np.uint8), **kwargs
        )

    def with_changes(self, **changes: Any) -> Plan:
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


def _refuse_change(self: Any, *args: Any, **kwargs: Any) -> None:
    raise TypeError("plan fields are read-only; make a changed plan with Plan.with_changes")


class _ReadOnlyDict(dict):
    """A JSON object of a plan: compares and serialises as a dict, refuses every change."""

    __setitem__ = __delitem__ = __ior__ = _refuse_change
    clear = pop = popitem = setdefault = update = _refuse_change

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (dict(self),)


class _ReadOnlyList(list):
    """A JSON list of a plan: compares and serialises as a list, refuses every change."""

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse_change
    append = clear = extend = insert = pop = remove = reverse = sort = _refuse_change

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (list(self),)


def _read_only(value: Any) -> Any:
    """A deep read-only copy of a JSON value (tuples stay tuples); depth was bounded by `check_consistency`."""
    if isinstance(value, dict):
        return _ReadOnlyDict((k, _read_only(v)) for k, v in value.items())
    if isinstance(value, list):
        return _ReadOnlyList(_read_only(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_read_only(v) for v in value)
    return value


def check_consistency(plan: Plan) -> None:
    """Refuse a plan that is internally inconsistent or that the runtime could not replay; messages name the field.

    Checks sizes against the `MAX_*` limits, the schedule, labels and spans, and the type and range of every field
    the runtime or `dit-plan` reads: policy parameters (static, adacache, bwcache), provenance, predictions and the
    extra arrays with a known meaning. Unknown policy kinds pass (`apply_plan` refuses them).

    Raises:
        PlanError: the first problem found, in one line.
    """
    _expect(
        plan.schema_version == SCHEMA_VERSION,
        f"unsupported plan schema version {plan.schema_version} (this runtime reads version {SCHEMA_VERSION}); refit "
        "the plan with this version of dit-plan",
    )
    _check_fingerprint(plan.model)
    blocks, steps = plan.num_blocks, plan.timesteps.shape[0] if plan.timesteps.ndim == 1 else -1
    _expect(
        plan.timesteps.ndim == 1 and 1 <= steps <= MAX_STEPS,
        f"field 'timesteps' must be a 1-D array of 1 to {MAX_STEPS} steps",
    )
    _expect(
        blocks * steps <= MAX_CELLS,
        f"the plan has {blocks} blocks × {steps} steps, more than the {MAX_CELLS} cells a plan may hold",
    )
    _expect(
        plan.actions.shape == (blocks, steps),
        f"field 'actions' has shape {tuple(plan.actions.shape)}, expected (blocks={blocks}, steps={steps})",
    )
    _expect(
        bool(np.all(plan.actions <= PRUNE)),
        "field 'actions' holds an unknown action code (known: 0 compute, 1 reuse, 2 prune)",
    )
    _expect(bool(np.all(np.isfinite(plan.timesteps))), "field 'timesteps' holds non-finite numbers")
    if plan.sigmas is not None:
        _expect(
            plan.sigmas.shape == (steps,), f"field 'sigmas' has shape {tuple(plan.sigmas.shape)}, expected ({steps},)"
        )
        _expect(bool(np.all(np.isfinite(plan.sigmas))), "field 'sigmas' holds non-finite numbers")
    _expect(
        len(plan.labels) == blocks and all(isinstance(label, str) and label in LABELS for label in plan.labels),
        f"field 'labels' must name one of {LABELS} for each of the {blocks} blocks",
    )
    _expect(
        plan.label_scores.shape == (blocks,),
        f"field 'label_scores' has shape {tuple(plan.label_scores.shape)}, expected ({blocks},)",
    )
    _expect(bool(np.all(np.isfinite(plan.label_scores))), "field 'label_scores' holds non-finite numbers")
    _expect(len(plan.spans) <= blocks, f"field 'spans' lists {len(plan.spans)} spans for {blocks} blocks")
    _validate_spans(plan.spans, plan.actions)
    _validate_reuse_has_source(plan)
    _validate_expert_starts(plan)
    _expect(
        isinstance(plan.policy, dict) and isinstance(plan.policy.get("kind"), str),
        "field 'policy' must be an object with a string 'kind'",
    )
    for key in ("policy", "provenance", "predicted"):
        _expect(isinstance(getattr(plan, key), dict), f"field '{key}' must be an object")
        _check_json_value(getattr(plan, key), key)
    _check_policy(plan.policy, blocks)
    _check_provenance(plan.provenance)
    _check_predicted(plan.predicted)
    _check_arrays(plan)


def _check_weight_samples(weights: Any, kind: type) -> None:
    """A fingerprint's `weights`: absent, or a `kind` (list in JSON, tuple in memory) of finite numbers."""
    _expect(
        weights is None
        or (isinstance(weights, kind) and len(weights) <= MAX_WEIGHT_SAMPLES and all(_is_number(w) for w in weights)),
        f"field 'model.weights' must be a list of at most {MAX_WEIGHT_SAMPLES} finite numbers",
    )


def _check_fingerprint(model: ModelFingerprint) -> None:
    _check_weight_samples(model.weights, tuple)
    for expert in model.experts:
        _check_weight_samples(expert.weights, tuple)
    names = model.expert_names
    _expect(len(set(names)) == len(names), f"field 'model.experts' names an expert twice ({', '.join(names)})")
    starts = [e.first_step for e in model.experts]
    _expect(
        all(s is None for s in starts) or (None not in starts and starts == sorted(set(starts))),
        "field 'model.experts' must give every expert's first_step, increasing, or none",
    )
    ids = model.block_ids
    _expect(
        isinstance(ids, (tuple, list)) and 1 <= len(ids) <= MAX_BLOCKS,
        f"field 'model.block_ids' must list 1 to {MAX_BLOCKS} blocks",
    )
    _expect(
        all(_is_name(b) for b in ids), f"field 'model.block_ids' must hold strings of 1 to {MAX_NAME_CHARS} characters"
    )
    _expect(len(set(ids)) == len(ids), "field 'model.block_ids' has duplicate block ids")
    _expect(
        _is_name(model.transformer_class) and _is_name(model.config_hash),
        f"fields 'model.transformer_class' and 'model.config_hash' must be strings of 1 to {MAX_NAME_CHARS} characters",
    )


def _validate_spans(spans: tuple[tuple[int, int], ...], actions: np.ndarray) -> None:
    seen = np.zeros(actions.shape[0], dtype=bool)
    for start, stop in spans:
        _expect(
            0 <= start < stop <= actions.shape[0], f"span [{start}, {stop}) is outside the {actions.shape[0]} blocks"
        )
        _expect(not seen[start:stop].any(), f"span [{start}, {stop}) overlaps another span")
        seen[start:stop] = True
        rows = actions[start:stop] == REUSE
        _expect(bool(np.all(rows == rows[0])), f"span [{start}, {stop}) groups blocks whose reuse steps differ")


def _validate_reuse_has_source(plan: Plan) -> None:
    for block, row in enumerate(plan.actions):
        reused = np.flatnonzero(row == REUSE)
        if reused.size:
            computed = np.flatnonzero(row != REUSE)
            _expect(
                computed.size > 0 and computed[0] < reused[0],
                f"block {plan.model.block_ids[block]!r} is reused at step {reused[0]} before it is ever computed",
            )


def _validate_expert_starts(plan: Plan) -> None:
    """A further expert starts with empty caches: reusing at its first step would read nothing (or the other
    expert's residual), so such a plan is refused."""
    for expert in plan.model.experts:
        step = expert.first_step
        if step is None:
            continue
        _expect(
            step < plan.actions.shape[1],
            f"expert {expert.name} starts at step {step}, after the plan's last step {plan.actions.shape[1] - 1}",
        )
        reused = np.flatnonzero(plan.actions[:, step] == REUSE)
        if reused.size:
            raise PlanError(
                f"block {plan.model.block_ids[reused[0]]!r} is reused at step {step}, the first step of expert "
                f"{expert.name} (reuse never crosses an expert switch)"
            )


def _check_json_value(value: Any, name: str) -> None:
    """Refuse what JSON cannot hold, non-finite numbers and nesting deeper than `MAX_JSON_DEPTH` (no recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list, tuple)):
            _expect(depth <= MAX_JSON_DEPTH, f"field '{name}' is nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                _expect(all(isinstance(k, str) for k in item), f"field '{name}' has an object key that is not a string")
                item = item.values()
            pending.extend((v, depth + 1) for v in item)
        elif isinstance(item, numbers.Real) and not isinstance(item, numbers.Integral):
            _expect(math.isfinite(item), f"field '{name}' holds non-finite numbers")
        else:
            _expect(
                item is None or isinstance(item, (str, numbers.Integral)),
                f"field '{name}' holds a {type(item).__name__}, which a plan cannot store",
            )


def _check_policy(policy: dict[str, Any], blocks: int) -> None:
    """Types and ranges of every policy parameter the runtime reads, so no replay fails after hooks are installed."""
    kind = policy["kind"]
    _expect(_is_name(kind), f"field 'policy.kind' must be a string of 1 to {MAX_NAME_CHARS} characters")
    if "reuse" in policy:
        from .replay_table import REUSE_MODES

        _expect(
            policy["reuse"] in REUSE_MODES,
            f"plan policy 'reuse' is {_show(policy['reuse'])}; this runtime knows {', '.join(REUSE_MODES)}",
        )
    if policy.get("reuse") == "slope":
        scale = policy.get("slope_scale")
        _expect(
            isinstance(scale, list)
            and 1 <= len(scale) <= MAX_POLICY_STEPS
            and all(_is_number(b) and 0.0 <= b <= len(scale) + 1 for b in scale),
            f"plan policy 'reuse: slope' needs 'slope_scale' as a list of 1 to {MAX_POLICY_STEPS} numbers in [0, run "
            f"length], got {_show(scale)}",
        )
    level = policy.get("cache_level", "block")
    _expect(
        level in CACHE_LEVELS,
        f"plan policy 'cache_level' is {_show(level)}; this runtime knows {', '.join(CACHE_LEVELS)}",
    )
    _expect(
        level == "block" or (kind == "static" and policy.get("reuse", "hold") == "hold"),
        "plan policy 'cache_level: attention' needs a static policy that holds its cache (no 'reuse' other than hold)",
    )
    check = _POLICY_CHECKS.get(kind)
    if check is not None:
        check(policy, blocks)
        _policy_int(policy, "protect_first", 0, MAX_POLICY_STEPS)
        _policy_int(policy, "protect_last", 0, MAX_POLICY_STEPS)


def _check_adacache(policy: dict[str, Any], blocks: int) -> None:
    _policy_int(policy, "probe_block", 0, blocks - 1)
    codebook = _policy_value(policy, "codebook")
    _expect(
        isinstance(codebook, (list, tuple))
        and 1 <= len(codebook) <= MAX_CODEBOOK
        and all(
            isinstance(e, (list, tuple))
            and len(e) == 2
            and _is_number(e[0])
            and e[0] >= 0
            and _is_int(e[1])
            and 0 <= e[1] <= MAX_POLICY_STEPS
            for e in codebook
        ),
        f"plan policy 'adacache' needs 'codebook' as 1 to {MAX_CODEBOOK} [threshold >= 0, reuse steps in [0, "
        f"{MAX_POLICY_STEPS}]] pairs",
    )
    moreg = _policy_value(policy, "moreg")
    _expect(isinstance(moreg, dict), "plan policy 'adacache' needs 'moreg' as an object")
    enabled = moreg.get("enabled", False)
    _expect(isinstance(enabled, bool), "plan policy 'adacache' needs 'moreg.enabled' as true or false")
    for key in ("norm", "exponent", "gradient_scale"):
        _expect(not enabled or key in moreg, f"plan policy 'adacache' enables MoReg but is missing 'moreg.{key}'")
    norm, exponent = moreg.get("norm", 1.0), moreg.get("exponent", 0.0)
    _expect(
        _is_number(norm) and norm > 0,
        f"plan policy 'adacache' needs 'moreg.norm' as a positive number, got {_show(norm)}",
    )
    _expect(
        _is_number(exponent) and 0 <= exponent <= MAX_MOREG_EXPONENT,
        f"plan policy 'adacache' needs 'moreg.exponent' in [0, {MAX_MOREG_EXPONENT:g}], got {_show(exponent)}",
    )
    _expect(
        exponent * max(0.0, -math.log(norm)) <= MAX_MOREG_LOG_SCALE,
        "plan policy 'adacache' has a 'moreg.norm' so small that (motion / norm)^exponent overflows",
    )
    _expect(
        _is_number(moreg.get("gradient_scale", 0.0)),
        f"plan policy 'adacache' needs 'moreg.gradient_scale' as a number, got {_show(moreg.get('gradient_scale'))}",
    )
    active = moreg.get("active", (0.0, 1.0))
    _expect(
        isinstance(active, (list, tuple))
        and len(active) == 2
        and all(_is_number(a) for a in active)
        and active[0] <= active[1],
        f"plan policy 'adacache' needs 'moreg.active' as a [start, stop] pair of numbers, got {_show(active)}",
    )


def _check_bwcache(policy: dict[str, Any], blocks: int) -> None:
    threshold = _policy_value(policy, "threshold")
    _expect(
        _is_number(threshold), f"plan policy 'bwcache' needs 'threshold' as a finite number, got {_show(threshold)}"
    )
    _policy_int(policy, "reuse_steps", 0, MAX_POLICY_STEPS)
    if "refresh_every" in policy or not policy.get("half_remaining"):
        _policy_int(policy, "refresh_every", 1, MAX_POLICY_STEPS)
    _expect(
        isinstance(policy.get("half_remaining", False), bool),
        f"plan policy 'bwcache' needs 'half_remaining' as true or false, got {_show(policy.get('half_remaining'))}",
    )
    indicators = _policy_value(policy, "indicator_blocks")
    _expect(
        isinstance(indicators, (list, tuple))
        and 1 <= len(indicators) <= blocks
        and all(_is_int(b) and 0 <= b < blocks for b in indicators),
        f"plan policy 'bwcache' needs 'indicator_blocks' as 1 to {blocks} block indices in [0, {blocks})",
    )


_POLICY_CHECKS: dict[str, Callable[[dict[str, Any], int], None]] = {
    "adacache": _check_adacache,
    "bwcache": _check_bwcache,
}


def _policy_value(policy: dict[str, Any], key: str) -> Any:
    _expect(key in policy, f"plan policy '{policy['kind']}' is missing '{key}'")
    return policy[key]


def _policy_int(policy: dict[str, Any], key: str, low: int, high: int) -> None:
    value = _policy_value(policy, key)
    _expect(
        _is_int(value) and low <= value <= high,
        f"plan policy '{policy['kind']}' needs '{key}' as an integer in [{low}, {high}], got {_show(value)}",
    )


def _check_provenance(provenance: dict[str, Any]) -> None:
    """The provenance entries `dit-plan inspect` and `validate` read: names, profiles and profile settings."""
    for key in ("method", "planner_version"):
        _expect(
            key not in provenance or _is_name(provenance[key]),
            f"field 'provenance.{key}' must be a string of 1 to {MAX_NAME_CHARS} characters",
        )
    for key in ("parameters", "chosen", "labels", "pca", "tightened", "profile_settings"):
        _expect(isinstance(provenance.get(key, {}), dict), f"field 'provenance.{key}' must be an object")
    profiles = provenance.get("profiles", [])
    _expect(
        isinstance(profiles, list)
        and all(
            isinstance(p, dict)
            and _is_name(p.get("path"), MAX_PATH_CHARS)
            and _is_name(p.get("sha256"))
            and _is_int(p.get("prompts"))
            and p["prompts"] >= 0
            for p in profiles
        ),
        "field 'provenance.profiles' must list objects with a string 'path' and 'sha256' and an integer 'prompts'",
    )
    settings = provenance.get("profile_settings", {})
    _expect(
        "guidance_scale" not in settings or _is_number(settings["guidance_scale"]),
        "field 'provenance.profile_settings.guidance_scale' must be a finite number",
    )
    sizes = [v for k, v in settings.items() if k.startswith("size_")]
    _expect(
        len(sizes) <= MAX_TENSOR_RANK
        and all(_is_int(v) and 1 <= v <= MAX_VIDEO_SIDE for v in sizes)
        and math.prod(sizes) <= MAX_VIDEO_VALUES,
        f"fields 'provenance.profile_settings.size_*' must be integers in [1, {MAX_VIDEO_SIDE}] whose product is at "
        f"most {MAX_VIDEO_VALUES}",
    )


def _check_predicted(predicted: dict[str, Any]) -> None:
    rules = {
        "speedup": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "compute_fraction": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "error": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "error_model": (_is_name, "a string"),
        "simulated_runs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    }
    for key, (valid, what) in rules.items():
        _expect(
            key not in predicted or valid(predicted[key]),
            f"field 'predicted.{key}' must be {what}, got {_show(predicted.get(key))}",
        )


_GRID_ARRAYS = ("dws_weight", "expected_compute", "error.drift", "error.prune")
_SHARE_ARRAYS = ("dws_weight", "expected_compute")
_BLOCK_ARRAYS = ("error.block_weight", "cost.block_flops", "cost.pruned_flops", "cost.attention_flops")
_COST_ARRAYS = ("cost.block_flops", "cost.pruned_flops", "cost.other_flops")
_PCA_NAME = re.compile(r"(pca|pca_explained)\.(\d{1,9})")


def _check_arrays(plan: Plan) -> None:
    """Extra arrays: storable and finite; those with a known meaning also of the right shape and range."""
    blocks, steps = plan.actions.shape
    shapes = {
        **dict.fromkeys(_GRID_ARRAYS, (blocks, steps)),
        **dict.fromkeys(_BLOCK_ARRAYS, (blocks,)),
        "error.step_weight": (steps,),
        "cost.other_flops": (1,),
    }
    _expect(len(plan.arrays) <= MAX_TENSORS, f"the plan holds {len(plan.arrays)} extra arrays, more than {MAX_TENSORS}")
    _expect(
        plan.policy.get("reuse") != "scale" or "reuse_gain" in plan.arrays,
        "plan policy 'reuse: scale' needs array 'reuse_gain'; refit the plan",
    )
    _expect(
        cache_level(plan) == "block"
        or "cost.attention_flops" in plan.arrays
        or not any(name in plan.arrays for name in _COST_ARRAYS),
        "plan policy 'cache_level: attention' with cost arrays needs array 'cost.attention_flops'; refit the plan",
    )
    for name, array in plan.arrays.items():
        _expect(_is_name(name) and not name.startswith("/"), f"extra array name {_show(name)} is not a valid name")
        _expect(isinstance(array, np.ndarray), f"extra array {name!r} is not an array")
        _expect(
            array.dtype.name in _SAFETENSORS_DTYPES,
            f"extra array {name!r} has dtype {array.dtype}, which a plan cannot store",
        )
        _expect(
            array.dtype.kind != "f" or bool(np.all(np.isfinite(array))),
            f"extra array {name!r} holds non-finite numbers",
        )
        expected = shapes.get(name)
        if expected is not None:
            _expect(
                array.dtype.kind in "fiu" and array.shape == expected,
                f"plan array {name!r} must be numbers of shape {expected}, got {array.dtype} {array.shape}",
            )
        if name == "reuse_gain":
            _expect(
                array.dtype.kind == "f" and array.ndim == 2 and array.shape[0] == steps and array.shape[1] >= 1,
                f"plan array 'reuse_gain' must be floats of shape ({steps}, run positions), got {array.dtype} "
                f"{array.shape}",
            )
            _expect(bool(np.all((array >= 0) & (array <= 2))), "plan array 'reuse_gain' must hold gains in [0, 2]")
        if name in _SHARE_ARRAYS:
            _expect(bool(np.all((array >= 0) & (array <= 1))), f"plan array {name!r} must hold values in [0, 1]")
        if name in _COST_ARRAYS or name == "cost.attention_flops":
            _expect(bool(np.all(array >= 0)), f"plan array {name!r} must hold FLOP counts >= 0")
        block_flops = plan.arrays.get("cost.block_flops")
        if name == "cost.attention_flops" and block_flops is not None and block_flops.shape == array.shape:
            _expect(
                bool(np.all(array <= block_flops)),
                "plan array 'cost.attention_flops' must not exceed 'cost.block_flops' (attention is part of a block)",
            )
        match = _PCA_NAME.fullmatch(name)
        if match is not None:
            _expect(int(match.group(2)) < blocks, f"plan array {name!r} names a block outside the {blocks} blocks")
            if match.group(1) == "pca":
                _expect(
                    array.dtype.kind == "f"
                    and array.ndim == 3
                    and array.shape[0] >= 1
                    and 1 <= array.shape[2] <= array.shape[1],
                    f"plan basis {name!r} must be floats of shape (heads, head_dim, rank) with 1 <= rank <= head_dim, "
                    f"got {array.shape}",
                )
            else:
                _expect(
                    array.dtype.kind == "f" and array.ndim == 1,
                    f"plan array {name!r} must be a 1-D float array, got {array.dtype} {array.shape}",
                )


def check_claims(plan: Plan) -> None:
    """Refuse a plan whose predictions disagree with what its own schedule and cost model determine.

    Recomputed: `compute_fraction` (static plans: from the actions; adaptive plans: from the simulated replays
    stored in `expected_compute`) and `speedup` (from those and the cost arrays `cost.block_flops`,
    `cost.pruned_flops`, `cost.other_flops`, when the plan stores them; an attention-level plan's reuse cells cost
    the block less its `cost.attention_flops`). The predicted error is not recomputed
    (it needs the planner's error model); docs/reliability.md lists what is and is not checked.

    Raises:
        PlanError: a stored claim differs from the recomputed one by more than `CLAIM_TOLERANCE`.
    """
    compute = _expected_compute(plan)
    if compute is None:
        return
    claimed = plan.predicted.get("compute_fraction")
    actual = float(np.mean(compute, dtype=np.float64))
    _expect(
        claimed is None or abs(claimed - actual) <= CLAIM_TOLERANCE,
        f"the plan claims compute fraction {_show(claimed)} but its schedule computes {actual:.4g}; it was edited "
        "after fitting: refit it",
    )
    claimed = plan.predicted.get("speedup")
    if claimed is None or not all(name in plan.arrays for name in _COST_ARRAYS):
        return
    block_flops = plan.arrays["cost.block_flops"].astype(np.float64)
    pruned_flops = plan.arrays["cost.pruned_flops"].astype(np.float64)
    other_flops = float(plan.arrays["cost.other_flops"][0])
    steps = plan.num_inference_steps
    pruned = compute * (plan.actions == PRUNE) if plan.policy["kind"] == "static" else np.zeros_like(compute)
    planned = float(
        ((compute - pruned) * block_flops[:, None] + pruned * pruned_flops[:, None]).sum() + other_flops * steps
    )
    if cache_level(plan) == "attention":
        running = block_flops - plan.arrays["cost.attention_flops"].astype(np.float64)
        planned += float(((plan.actions == REUSE) * running[:, None]).sum())
    full = float((block_flops.sum() + other_flops) * steps)
    actual = full / planned if full > 0 and planned > 0 else math.nan
    _expect(
        abs(claimed - actual) <= CLAIM_TOLERANCE * actual,
        f"the plan claims speedup {_show(claimed)} but its schedule and cost arrays give {actual:.4g}; it was edited "
        "after fitting: refit it",
    )


def cache_level(plan: Plan) -> str:
    """What the plan's reuse cells replay: "block" (the residual; plans without the key) or "attention"."""
    return plan.policy.get("cache_level", "block")


def _expected_compute(plan: Plan) -> np.ndarray | None:
    """Per cell, the share of generations that compute it: from the actions (static) or the stored simulation."""
    kind = plan.policy["kind"]
    if kind == "static":
        return (plan.actions != REUSE).astype(np.float64)
    if kind in _ADAPTIVE_KINDS and "expected_compute" in plan.arrays:
        return plan.arrays["expected_compute"].astype(np.float64)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number that converts to a float (so not a bool, and no integer beyond the float range)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _is_name(value: Any, limit: int = MAX_NAME_CHARS) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= limit


def _show(value: Any) -> str:
    """A short, escaped rendering of a value from a file, for messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
        digest.update(array)
    return digest.hexdigest()


def _signature(checksum: str, key: bytes) -> str:
    """HMAC-SHA256 under `key` of the content checksum (which covers the metadata text and every tensor)."""
    return hmac.new(key, f"dit-plan-signature-v1:{checksum}".encode(), hashlib.sha256).hexdigest()


def _check_key(key: Any) -> None:
    _expect(isinstance(key, bytes) and len(key) >= 1, "a plan signing key must be non-empty bytes")


_SAFETENSORS_DTYPES = {
    "uint8": "U8",
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "int32": "I32",
    "int64": "I64",
    "int8": "I8",
    "int16": "I16",
    "bool": "BOOL",
}
_NUMPY_DTYPES = {code: np.dtype(name).newbyteorder("<") for name, code in _SAFETENSORS_DTYPES.items()}


def plan_to_bytes(plan: Plan, key: bytes | None = None) -> bytes:
    """Serialise a plan to the bytes of a `.plan` file, signed with `key` when one is given.

    The safetensors container is laid out here rather than by `safetensors.save`, which writes metadata keys in hash
    order: tensors sorted by name, header JSON with sorted keys, padded to 8 bytes, so equal plans give equal bytes.

    Args:
        plan: the plan to write.
        key: secret bytes; when given, the metadata also holds an HMAC-SHA256 of the content checksum.

    Raises:
        PlanError: the plan holds something a plan file cannot store, or the key is not bytes.
    """
    try:
        text, tensors = _canonical(plan)
    except ValueError as exc:
        raise PlanError(f"plan metadata cannot be written as JSON: {exc}") from None
    checksum = _checksum(text, tensors)
    metadata = {"content_sha256": checksum, "dit_plan": text}
    if key is not None:
        _check_key(key)
        metadata[SIGNATURE_KEY] = _signature(checksum, key)
    header: dict[str, Any] = {"__metadata__": metadata}
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


def save_plan(plan: Plan, path: str | os.PathLike, key: bytes | None = None) -> Path:
    """Write `plan` to `path` atomically (temporary file, then rename), so no partial plan is ever left behind.

    Args:
        plan: the plan to write; its predictions must agree with its schedule (`check_claims`).
        path: destination file.
        key: secret bytes to sign the plan with (see `load_plan`); None writes an unsigned plan.

    Raises:
        PlanError: the plan's claims disagree with its schedule, or it cannot be serialised.
    """
    check_claims(plan)
    return write_bytes_atomic(path, plan_to_bytes(plan, key))


def load_plan(path: str | os.PathLike, key: bytes | None = None) -> Plan:
    """Read and validate a `.plan` file; anything that is not a valid plan raises `PlanError` with one line.

    Only a regular file is read (a FIFO, device or directory is refused without blocking), at most
    `MAX_PLAN_BYTES`; see `plan_from_bytes` for what is checked.

    Args:
        path: the plan file.
        key: secret bytes; when given, the plan must carry a matching signature (`save_plan(…, key=…)`).

    Raises:
        PlanError: the file cannot be read, is not a valid plan, its claims disagree with its schedule, or (with
            `key`) it is unsigned or signed with another key.
    """
    return _plan_from_buffer(_read_regular_file(path, MAX_PLAN_BYTES, "plan file"), str(path), key)


def read_key_file(path: str | os.PathLike) -> bytes:
    """The signing key held in a file: its bytes without surrounding whitespace, at least `MIN_KEY_BYTES` long.

    Raises:
        PlanError: the file cannot be read, is not a regular file, or holds a key too short or too long.
    """
    key = bytes(_read_regular_file(path, MAX_KEY_BYTES, "key file").strip())
    _expect(
        len(key) >= MIN_KEY_BYTES,
        f"key file {path} holds {len(key)} bytes; a signing key needs at least {MIN_KEY_BYTES}",
    )
    return key


def _read_regular_file(path: str | os.PathLike, limit: int, what: str) -> bytearray:
    """The bytes of a regular file of at most `limit` bytes; opened non-blocking so a FIFO or device never blocks."""
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_NOCTTY", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
        try:
            info = os.fstat(fd)
            _expect(
                stat.S_ISREG(info.st_mode),
                f"{path} is not a regular file (a {_file_kind(info.st_mode)}); a {what} is read from a regular file "
                "only",
            )
            _expect(
                info.st_size <= limit, f"{path} is {info.st_size} bytes, larger than any {what} ({limit} bytes at most)"
            )
            handle = os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        with handle:
            buffer = bytearray(info.st_size)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                count = handle.readinto(view[done:])
                _expect(bool(count), f"{path} shrank while it was read")
                done += count
            _expect(not handle.read(1), f"{path} grew while it was read")
    except OSError as exc:
        raise PlanError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return buffer


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def plan_from_bytes(data: bytes | bytearray, source: str = "<bytes>", key: bytes | None = None) -> Plan:
    """Parse the bytes of a `.plan` file (see `load_plan`); the plan's tensors are views of a private copy of `data`.

    In order: the container (header size, JSON depth and size, dtypes, shapes and offsets, before any tensor is
    made), the checksum, the signature when `key` is given, the metadata (size and depth before parsing, then every
    field), the plan's consistency (`check_consistency`) and its claims (`check_claims`).

    Args:
        data: the file's bytes.
        source: name used in error messages.
        key: secret bytes; when given, the plan must carry a matching signature.

    Raises:
        PlanError: one line naming the first problem found.
    """
    _expect(
        len(data) <= MAX_PLAN_BYTES,
        f"{source}: {len(data)} bytes, larger than any plan ({MAX_PLAN_BYTES} bytes at most)",
    )
    return _plan_from_buffer(bytearray(data), source, key)


def _plan_from_buffer(data: bytearray, source: str, key: bytes | None) -> Plan:
    """`plan_from_bytes` on a buffer nobody else holds: the plan's tensors are views of it, not copies."""
    if key is not None:
        _check_key(key)
    metadata, tensors = _read_container(data, source)
    text = metadata.get("dit_plan")
    _expect(isinstance(text, str), f"{source}: not a dit-plan file (no 'dit_plan' metadata)")
    checksum = _checksum(text, tensors)
    _expect(
        metadata.get("content_sha256") == checksum,
        f"{source}: plan content does not match its checksum (the file was modified or corrupted); refit or "
        "re-download it",
    )
    if key is not None:
        signature = metadata.get(SIGNATURE_KEY)
        _expect(
            isinstance(signature, str),
            f"{source}: the plan is not signed, and a key was given; use a plan signed with that key (dit-plan fit "
            "--sign-key-file)",
        )
        _expect(
            hmac.compare_digest(signature, _signature(checksum, key)),
            f"{source}: the plan's signature does not match the key (signed with another key, or edited after signing)",
        )
    _expect(
        len(text) <= MAX_METADATA_CHARS,
        f"{source}: plan metadata is {len(text)} characters, more than {MAX_METADATA_CHARS}",
    )
    meta = _parse_json(text.encode("utf-8", "surrogatepass"), source, "plan metadata")
    try:
        plan = _plan_from_parts(meta, tensors)
        check_claims(plan)
    except PlanError as exc:
        raise PlanError(f"{source}: {exc}") from None
    return plan


def _plan_from_parts(meta: Any, tensors: dict[str, np.ndarray]) -> Plan:
    _expect(
        isinstance(meta, dict) and meta.get("format") == FORMAT_NAME,
        f"not a dit-plan file (metadata has no format '{FORMAT_NAME}')",
    )
    version = meta.get("schema_version")
    _expect(
        version == SCHEMA_VERSION and _is_int(version),
        f"unsupported plan schema version {_show(version)} (this runtime reads version {SCHEMA_VERSION}); refit the "
        "plan with this version of dit-plan",
    )
    for key in _REQUIRED_KEYS:
        _expect(key in meta, f"plan metadata is missing field '{key}'")
    for key in ("actions", "label_scores", "timesteps"):
        _expect(key in tensors, f"plan is missing tensor '{key}'")
    limits = {"timesteps": MAX_STEPS, "sigmas": MAX_STEPS, "label_scores": MAX_BLOCKS, "actions": MAX_CELLS}
    for key, limit in limits.items():
        if key in tensors:
            _expect(
                tensors[key].size <= limit,
                f"tensor '{key}' has {tensors[key].size} values, more than a plan may hold ({limit})",
            )
    names = meta.get("arrays", [])
    _expect(
        isinstance(names, list) and all(_is_name(n) for n in names) and len(set(names)) == len(names),
        "field 'arrays' must list distinct array names",
    )
    _expect(all(f"arrays/{n}" in tensors for n in names), "plan lists extra arrays that it does not contain")
    _expect(
        len(tensors) == 3 + ("sigmas" in tensors) + len(names), "plan holds tensors that its metadata does not declare"
    )
    _expect(isinstance(meta["spans"], list), "field 'spans' must be a list of [start, stop] pairs")
    _expect(isinstance(meta["labels"], list), "field 'labels' must be a list")
    _expect(_is_int(meta["num_inference_steps"]), "field 'num_inference_steps' must be an integer")
    for key, kind in (("actions", "u"), ("label_scores", "f"), ("timesteps", "f"), ("sigmas", "f")):
        if key in tensors:
            _expect(tensors[key].dtype.kind == kind, f"plan tensor '{key}' has the wrong dtype {tensors[key].dtype}")
    plan = Plan(
        model=ModelFingerprint.from_json(meta["model"]),
        timesteps=tensors["timesteps"],
        sigmas=tensors.get("sigmas"),
        actions=tensors["actions"],
        labels=tuple(meta["labels"]),
        label_scores=tensors["label_scores"],
        spans=tuple(meta["spans"]),
        policy=meta["policy"],
        provenance=meta["provenance"],
        predicted=meta["predicted"],
        arrays={n: tensors[f"arrays/{n}"] for n in names},
        schema_version=version,
    )
    _expect(
        plan.num_inference_steps == meta["num_inference_steps"],
        "field 'num_inference_steps' disagrees with the timestep grid",
    )
    return plan


def _read_container(data: bytearray, source: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse the safetensors container: (metadata, tensor views of `data`); never unpickles anything.

    Every dtype, shape and offset is checked against the file size before a tensor is made, and the tensors must
    tile the data section exactly (no holes, overlaps or trailing bytes), as the safetensors format requires.
    """

    def refuse(condition: bool, reason: str) -> None:
        _expect(condition, f"{source}: not a dit-plan file ({reason})")

    refuse(len(data) >= 8, "too short to be a safetensors container")
    header_len = int.from_bytes(data[:8], "little")
    refuse(header_len <= len(data) - 8, "no valid safetensors header; a pickle or archive renamed .plan?")
    refuse(header_len <= MAX_HEADER_BYTES, f"its header is {header_len} bytes, more than {MAX_HEADER_BYTES}")
    header = _parse_json(
        bytes(memoryview(data)[8 : 8 + header_len]), source, "not a dit-plan file: its container header"
    )
    refuse(isinstance(header, dict), "the safetensors header is not an object")
    metadata = header.pop("__metadata__", {})
    refuse(
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()),
        "container metadata is not a map of strings",
    )
    refuse(len(header) <= MAX_TENSORS, f"the container declares {len(header)} tensors, more than {MAX_TENSORS}")
    start, size = 8 + header_len, len(data) - 8 - header_len
    entries = []
    for name, info in header.items():
        refuse(
            _is_name(name) and isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"},
            f"entry {_show(name)} is not a tensor description",
        )
        dtype = _NUMPY_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        refuse(dtype is not None, f"tensor {name!r} has an unknown dtype {_show(info['dtype'])}")
        refuse(
            isinstance(shape, list)
            and len(shape) <= MAX_TENSOR_RANK
            and all(_is_int(d) and 0 <= d <= size for d in shape),
            f"tensor {name!r} has an invalid shape {_show(shape)}",
        )
        refuse(
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= size,
            f"tensor {name!r} has data offsets {_show(offsets)} outside the {size} data bytes",
        )
        count = math.prod(shape)
        refuse(
            count * dtype.itemsize == offsets[1] - offsets[0],
            f"tensor {name!r} of shape {shape} does not fill its {offsets[1] - offsets[0]} data bytes",
        )
        entries.append((offsets[0], offsets[1], name, dtype, shape, count))
    position = 0
    for begin, end, *_ in sorted(entries, key=lambda e: (e[0], e[1])):
        refuse(begin == position, "its tensors overlap or leave holes in the data section")
        position = end
    refuse(position == size, f"{size - position} bytes follow the last tensor")
    tensors = {}
    for begin, _, name, dtype, shape, count in entries:
        tensors[name] = np.frombuffer(data, dtype=dtype, count=count, offset=start + begin).reshape(shape)
    return metadata, tensors


def _parse_json(text: bytes, source: str, what: str) -> Any:
    """Parse UTF-8 JSON after measuring it without recursion: depth and value count within the limits first."""
    try:
        decoded = text.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise PlanError(f"{source}: {what} is not UTF-8 text") from None
    depth, values = _json_extent(text)
    _expect(depth <= MAX_JSON_DEPTH, f"{source}: {what} is nested {depth} levels deep, more than {MAX_JSON_DEPTH}")
    _expect(values <= MAX_JSON_VALUES, f"{source}: {what} holds about {values} values, more than {MAX_JSON_VALUES}")
    try:
        return json.loads(decoded)
    except (ValueError, RecursionError):
        raise PlanError(f"{source}: {what} is not valid JSON") from None


_SCAN_CHUNK = 1 << 16


def _json_extent(text: bytes) -> tuple[int, int]:
    """(deepest nesting, number of values) of UTF-8 JSON text, counting brackets and separators outside strings.

    Escaped backslashes and quotes are removed first, so the remaining quotes delimit strings; in valid UTF-8 these
    ASCII bytes never occur inside a multi-byte character. Text that is not valid JSON may be measured wrongly past
    its first error, where the parser stops anyway. Works in chunks, so it allocates a few bytes per chunk byte.
    """
    plain = np.frombuffer(text.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    depth = deepest = values = 0
    in_string = 0
    for offset in range(0, plain.size, _SCAN_CHUNK):
        chunk = plain[offset : offset + _SCAN_CHUNK]
        parity = (np.cumsum(chunk == ord('"'), dtype=np.uint8) + in_string) & 1
        outside = parity == 0
        opens = ((chunk == ord("[")) | (chunk == ord("{"))) & outside
        closes = ((chunk == ord("]")) | (chunk == ord("}"))) & outside
        levels = np.cumsum(opens.astype(np.int64) - closes, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        values += int(np.count_nonzero(opens)) + int(
            np.count_nonzero(((chunk == ord(",")) | (chunk == ord(":"))) & outside)
        )
        in_string = int(parity[-1])
    return deepest, values + 1
