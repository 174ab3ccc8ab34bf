"""Hostile and broken files: seeded mutation loops over valid .plan and .h5 files.

Every mutated file must either load to a valid object or raise the project's own error with a one-line message:
never another exception, a hang, code execution, or an allocation beyond the stated bounds
(plans: the file size, at most `MAX_PLAN_BYTES`; profiles: `MAX_FIELD_VALUES` values per field read).
"""

from __future__ import annotations

import io
import json
import pickle
import random
import struct
import time
import zipfile

import numpy as np
import pytest

from profiler.schema import FIELDS, ProfileError, ProfileHeader, ProfileWriter, PromptInfo, open_profile
from runtime import ModelFingerprint, Plan, PlanError
from runtime.plan import _checksum, plan_from_bytes, plan_to_bytes

FUZZ_CASES = 1000
PER_CASE_SECONDS = 2.0
FP = ModelFingerprint("WanTransformer3DModel", "ab" * 32, ("blocks.0", "blocks.1", "blocks.2"))


def valid_plan() -> Plan:
    actions = np.zeros((3, 5), np.uint8)
    actions[1:, 2:4] = 1
    return Plan(model=FP, timesteps=np.linspace(999, 1, 5), sigmas=np.linspace(1, 0.01, 5), actions=actions,
                spans=((1, 3),), predicted={"speedup": 1.4}, arrays={"pca.0": np.eye(4, 2, dtype=np.float32)[None]})


class Trap:
    """Unpickling this would run code; a loader that unpickles fails the test loudly."""

    def __reduce__(self):
        return (pytest.fail, ("a plan loader executed pickled code",))


def _rewrite_header(data: bytes, rng: random.Random) -> bytes:
    """Mutate the safetensors header JSON (dtypes, shapes, offsets, metadata), keeping the checksum consistent."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    choice = rng.randrange(7)
    if choice == 0:
        header[name]["dtype"] = rng.choice(["F16", "F64", "I64", "U8", "BOOL", "F32", "X9"])
    elif choice == 1:
        header[name]["shape"] = [rng.choice([0, 1, 3, 5, 2**40])] * rng.randint(1, 3)
    elif choice == 2:
        header[name]["data_offsets"] = [rng.randrange(0, 2**40), rng.randrange(0, 2**62)]
    elif choice == 3:
        del header[name]
    else:
        meta = json.loads(header["__metadata__"]["dit_plan"])
        key = rng.choice(sorted(meta))
        meta[key] = rng.choice([None, -1, 10**30, "x", [], {}, [[0, 99]], float("nan") if choice == 4 else 7])
        if choice == 5:
            meta.pop(key)
        if choice == 6:
            meta[f"extra_{rng.randrange(9)}"] = {"kind": "static"}
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
        header["__metadata__"]["dit_plan"] = text
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


def mutate_plan(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return data[: rng.randrange(len(data))]
    if kind == 1:
        out = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 2:
        return struct.pack("<Q", rng.choice([2**63, 2**40, len(data), 0])) + data[8:]
    if kind == 3:
        return pickle.dumps({"actions": Trap()})
    if kind == 4:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(Trap()))
        return buffer.getvalue()
    if kind == 5:
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return _rewrite_header(data, rng)


def _load_outcome(load, payload) -> str:
    start = time.perf_counter()
    try:
        load(payload)
        outcome = "loaded"
    except (PlanError, ProfileError) as exc:
        message = str(exc)
        assert message and "\n" not in message, f"multi-line error: {message!r}"
        outcome = "refused"
    assert time.perf_counter() - start < PER_CASE_SECONDS, "a case took too long (hang?)"
    return outcome


def test_plan_fuzz_never_crashes_hangs_or_executes_code():
    rng = random.Random(1234)
    data = plan_to_bytes(valid_plan())
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(FUZZ_CASES):
        outcomes[_load_outcome(plan_from_bytes, mutate_plan(data, rng))] += 1
    assert outcomes["refused"] > FUZZ_CASES // 2
    print(f"plan fuzz: {outcomes}")


def test_tampered_plan_with_valid_structure_is_refused():
    data = plan_to_bytes(valid_plan())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["dit_plan"])
    meta["predicted"]["speedup"] = 9.9  # a plausible edit that keeps every field valid
    header["__metadata__"]["dit_plan"] = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    encoded = json.dumps(header).encode()
    with pytest.raises(PlanError, match="checksum"):
        plan_from_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])


def small_profile(path) -> None:
    blocks, steps, grid = 3, 4, (2, 2, 2)
    header = ProfileHeader(
        fingerprint=FP, settings={"num_inference_steps": steps}, branches=("cond", "uncond"), grid=grid,
        adapter="wan", cfg_mode="separate", timesteps=np.linspace(999, 1, steps), sigmas=np.linspace(1, 0, steps),
        block_flops=np.full(blocks, 100, np.int64), block_seconds=np.full(blocks, 0.01), model_flops=400, model_seconds=0.04,
    )
    rng = np.random.default_rng(0)
    arrays = {name: rng.random((2, steps, blocks)) for name in ("residual_rel_l1", "residual_cos", "output_rel_l1", "output_cos", "residual_norm", "output_norm", "motion")}
    arrays.update(model_output_rel_l1=rng.random((2, steps)), attention_steps=np.arange(2), query_index=np.arange(4),
                  attention_received=rng.random((2, blocks, *grid)), foreground=rng.integers(0, 2, grid),
                  feature_queries=rng.random((blocks, 8, 2, 4)), feature_keys=rng.random((blocks, 8, 2, 4)))
    writer = ProfileWriter(path, header)
    writer.add_prompt(PromptInfo("p00000", 0, "a red circle", "", 0), arrays)


def _read_everything(path) -> None:
    profile = open_profile(path)
    for info in profile.prompts:
        for name in FIELDS:
            if profile.has(name):
                profile.read(info, name)


def test_profile_fuzz_never_crashes_or_hangs(tmp_path):
    original = tmp_path / "valid.h5"
    small_profile(original)
    _read_everything(original)
    data = original.read_bytes()
    rng = random.Random(99)
    outcomes = {"loaded": 0, "refused": 0}
    target = tmp_path / "fuzz.h5"
    for _ in range(FUZZ_CASES):
        kind = rng.randrange(4)
        mutated = bytearray(data)
        if kind == 0:
            mutated = mutated[: rng.randrange(len(mutated))]
        elif kind == 1:
            for _ in range(rng.randint(1, 16)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            start = rng.randrange(len(mutated))
            mutated[start : start + 64] = bytes(rng.randrange(256) for _ in range(64))[: len(mutated) - start]
        else:
            mutated = bytearray(pickle.dumps({"a": 1}))
        target.write_bytes(bytes(mutated))
        outcomes[_load_outcome(_read_everything, target)] += 1
    assert outcomes["refused"] > FUZZ_CASES // 10
    print(f"profile fuzz: {outcomes}")
