"""Load one or more profiles of the same model as one merged set of prompts.

Several profiling runs (or shards) of one model merge by concatenating their prompts; profiles of different models,
different profiling settings or different step grids are refused with the reason. Each source is identified by the
SHA-256 of its file, which plans record as provenance.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_accel.profiler.schema import FIELDS, Profile, ProfileHeader, open_profile

from .errors import PlannerError

DRIFT_FIELDS = ("residual_rel_l1", "residual_norm", "output_norm")


@dataclass(frozen=True)
class ProfileSource:
    """One profile file that went into a fit: where it was, its checksum, and how many prompts it held."""

    path: str
    sha256: str
    prompts: int

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "prompts": self.prompts}


@dataclass(frozen=True)
class ProfileSet:
    """Profiles of one model read as one: the first header, and fields stacked over all their prompts."""

    header: ProfileHeader
    profiles: tuple[Profile, ...]
    sources: tuple[ProfileSource, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.header.fingerprint.block_ids)

    @property
    def num_steps(self) -> int:
        return int(self.header.timesteps.shape[0])

    @property
    def expert_starts(self) -> np.ndarray:
        """Boolean [steps]: the first step of each further expert of a multi-expert pipeline (Wan 2.2's
        `transformer_2`), which every plan computes in full: the expert's caches are empty there."""
        return self.header.fingerprint.expert_starts(self.num_steps)

    def has(self, *fields: str) -> bool:
        """Whether every prompt of every profile recorded all `fields`."""
        return all(p.has(name) for p in self.profiles for name in fields)

    def require(self, fields: Sequence[str], purpose: str) -> None:
        """Refuse (one line) when a field `purpose` needs is missing from some prompt."""
        missing = [name for name in fields if not self.has(name)]
        if not missing:
            return
        settings = [FIELDS[name].setting for name in missing]
        if all(s is not None and self.header.settings.get(s) for s in settings):
            hint = (
                "the profiler was asked to record them but this model's attention gave it nothing to sample (e.g. "
                "linear attention, which computes no attention scores): pick a method that does not need them"
            )
        else:
            hint = "re-profile recording them"
        raise PlannerError(
            f"{purpose} needs profile field(s) {', '.join(missing)}, which the profile does not hold for every "
            f"prompt ({hint})"
        )

    def stack_recorded(self, field: str) -> np.ndarray | None:
        """Field `field` of the prompts that recorded it (some fields are recorded for the first prompts only), or
        None."""
        arrays = [p.read(info, field) for p in self.profiles for info in p.prompts if p.recorded(info, field)]
        if not arrays:
            return None
        if len({a.shape for a in arrays}) != 1:
            raise PlannerError(f"profile field {field} has different shapes across prompts")
        return np.stack(arrays)

    def stack(self, field: str) -> np.ndarray:
        """Field `field` of every prompt of every profile, along a leading prompt axis."""
        arrays = [p.stack(field) for p in self.profiles]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) != 1:
            raise PlannerError(f"profile field {field} has different shapes across profiles: {sorted(shapes)}")
        return np.concatenate(arrays)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_profiles(paths: Sequence[str | os.PathLike]) -> ProfileSet:
    """Open every profile, check they describe the same model and run settings, and merge them."""
    if not paths:
        raise PlannerError("no profile given")
    profiles = tuple(open_profile(p) for p in paths)
    first = profiles[0]
    for other in profiles[1:]:
        reason = _merge_conflict(first.header, other.header)
        if reason:
            raise PlannerError(f"cannot merge {first.path} and {other.path}: {reason}")
    for profile in profiles:
        if not profile.prompts:
            raise PlannerError(f"{profile.path}: the profile holds no complete prompt")
    sources = tuple(ProfileSource(str(Path(p.path).resolve()), file_sha256(p.path), len(p.prompts)) for p in profiles)
    return ProfileSet(first.header, profiles, sources)


def _merge_conflict(a: ProfileHeader, b: ProfileHeader) -> str | None:
    """Why two profiles cannot be fitted together, or None."""
    reason = a.compatible_with(b)
    if reason:
        return reason
    if a.timesteps.shape != b.timesteps.shape or not np.allclose(a.timesteps, b.timesteps):
        return f"profiles use different timestep grids ({a.timesteps.shape[0]} vs {b.timesteps.shape[0]} steps)"
    if a.branches != b.branches or tuple(a.grid) != tuple(b.grid):
        return "profiles differ in CFG branches or token grid"
    return None


def mean_residual_drift(path: str | os.PathLike) -> np.ndarray:
    """Profiled residual relative-L1 drift of one profile, averaged over prompts and branches: [blocks, steps]."""
    profile = open_profile(path)
    if not profile.prompts:
        raise PlannerError(f"{path}: the profile holds no complete prompt")
    return profile.stack("residual_rel_l1").astype(np.float64).mean(axis=(0, 1)).T
