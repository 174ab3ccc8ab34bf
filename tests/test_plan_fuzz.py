"""Generated hostile `.plan` files: every case loads as a plan that is consistent, claims what its schedule does and
replays and renders without error, or is refused with a one-line `PlanError`; nothing else, within a time limit.

Cases are mutations of three tiny valid plans (static with spans, prune and blend weights; adacache; bwcache):
wrong types and values anywhere in the metadata, deep nesting, oversized JSON, tensors of other dtypes, shapes and
values, huge declared shapes and offsets, truncations, bit flips, appended bytes, claims that disagree with the
schedule, and signatures. Most rewrites recompute the content checksum, so they reach the checks behind it.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from dit_accel.planner.summary import plan_report, render_report
from dit_accel.planner.validate import profiled_generation
from dit_accel.runtime import ModelFingerprint, Plan, PlanError, load_plan, save_plan
from dit_accel.runtime.adaptive import POLICIES
from dit_accel.runtime.plan import (
    MAX_PLAN_BYTES,
    MAX_VIDEO_VALUES,
    PRUNE,
    REUSE,
    _canonical,
    _checksum,
    _signature,
    check_consistency,
    plan_from_bytes,
    plan_to_bytes,
)
from dit_accel.runtime.replay_table import CompiledSchedule

CASES = 2400
CASE_SECONDS = 2.0
SEED = 20240607
BLOCKS, STEPS = 4, 8
FP = ModelFingerprint("WanTransformer3DModel", "ab" * 32, tuple(f"blocks.{i}" for i in range(BLOCKS)))
KEY = b"fuzz-signing-key-0123456789"
TOKEN = "@@HOSTILE@@"


def recomputed_claims(plan: Plan) -> dict[str, float]:
    """The claims a plan's own schedule and cost arrays determine (this test's own arithmetic)."""
    kind = plan.policy["kind"]
    if kind == "static":
        computed = (plan.actions != REUSE).astype(np.float64)
        pruned = (plan.actions == PRUNE).astype(np.float64)
    elif kind in ("adacache", "bwcache") and "expected_compute" in plan.arrays:
        computed, pruned = plan.arrays["expected_compute"].astype(np.float64), np.zeros(plan.actions.shape)
    else:
        return {}
    claims = {"compute_fraction": float(computed.mean())}
    if all(f"cost.{n}" in plan.arrays for n in ("block_flops", "pruned_flops", "other_flops")):
        full_block = plan.arrays["cost.block_flops"].astype(np.float64)
        pruned_block = plan.arrays["cost.pruned_flops"].astype(np.float64)
        other = float(plan.arrays["cost.other_flops"][0]) * plan.num_inference_steps
        cost = float(np.sum(full_block[:, None] * (computed - pruned) + pruned_block[:, None] * pruned)) + other
        full = float(full_block.sum()) * plan.num_inference_steps + other
        claims["speedup"] = full / cost if cost > 0 and full > 0 else math.nan
    return claims


def _cost_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    block = rng.uniform(50, 100, BLOCKS)
    return {
        "cost.block_flops": block,
        "cost.pruned_flops": block * 0.6,
        "cost.other_flops": np.array([10.0]),
        "error.drift": rng.uniform(0, 0.1, (BLOCKS, STEPS)).astype(np.float32),
        "error.prune": rng.uniform(0, 0.1, (BLOCKS, STEPS)).astype(np.float32),
        "error.step_weight": np.full(STEPS, 1 / STEPS, np.float32),
        "error.block_weight": np.ones(BLOCKS, np.float32),
    }


def _with_claims(plan: Plan, **extra) -> Plan:
    return plan.with_changes(
        predicted={**recomputed_claims(plan), "error": 0.05, "error_model": "stale-drift-v1", **extra}
    )


def base_plans() -> list[Plan]:
    rng = np.random.default_rng(0)
    provenance = {
        "method": "auto",
        "planner_version": "0.1.0",
        "parameters": {"warmup": 1, "target_speedup": 1.5},
        "profiles": [{"path": "/nonexistent/profile.h5", "sha256": "cd" * 32, "prompts": 2}],
        "profile_settings": {"guidance_scale": 5.0, "size_height": 32, "size_width": 32, "size_num_frames": 5},
    }
    actions = np.zeros((BLOCKS, STEPS), np.uint8)
    actions[1:3, 3:5] = REUSE
    actions[3, 4] = PRUNE
    actions[0, 6] = REUSE
    dws = np.ones((BLOCKS, STEPS), np.float32)
    dws[3, 4] = 0.4
    static = Plan(
        model=FP,
        timesteps=np.linspace(999, 1, STEPS),
        sigmas=np.linspace(1, 0.01, STEPS),
        actions=actions,
        labels=("foreground", "background", "background", "unlabelled"),
        label_scores=np.array([0.9, 0.1, 0.2, 0], np.float32),
        spans=((1, 3),),
        policy={"kind": "static", "reuse": "extrapolate"},
        provenance=provenance,
        arrays={
            **_cost_arrays(rng),
            "dws_weight": dws,
            "pca.3": np.eye(4, 2, dtype=np.float32)[None].repeat(2, 0),
            "pca_explained.3": np.array([0.7, 0.2], np.float32),
        },
    )
    expected = rng.uniform(0.3, 1.0, STEPS).astype(np.float32)[None].repeat(BLOCKS, 0)
    adaptive_arrays = {**_cost_arrays(rng), "expected_compute": expected}
    adacache = {
        "kind": "adacache",
        "probe_block": 1,
        "codebook": [[0.05, 3], [0.2, 1], [1e9, 0]],
        "moreg": {"enabled": True, "norm": 0.3, "exponent": 8.0, "gradient_scale": 10.0, "active": [0.1, 0.9]},
        "protect_first": 1,
        "protect_last": 1,
    }
    bwcache = {
        "kind": "bwcache",
        "threshold": 0.3,
        "reuse_steps": 2,
        "indicator_blocks": [0, 2],
        "protect_first": 1,
        "protect_last": 1,
        "refresh_every": 4,
    }
    adaptive = [
        Plan(
            model=FP,
            timesteps=np.linspace(999, 1, STEPS),
            actions=np.zeros((BLOCKS, STEPS), np.uint8),
            spans=((0, BLOCKS),),
            policy=policy,
            provenance=provenance,
            arrays=adaptive_arrays,
        )
        for policy in (adacache, bwcache)
    ]
    return [_with_claims(static), *(_with_claims(p, simulated_runs=4) for p in adaptive)]


def deep_text(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


def hostile_values(rng: random.Random) -> list:
    """Values to drop anywhere in a plan's metadata ('@@HOSTILE@@' strings become raw JSON text)."""
    # fmt: off
    return [
        None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**400, 10**30, -(10**30), 0.0, 0.5, -0.5, 1e-300,
        1e308, -1e308, float("nan"), float("inf"), "", "x", "\x1b]0;pwned\x07", "a\u202eb\r\n", "static",
        "adacache", "bwcache", "hold", "quadratic", [], {}, [0], [1, 2], [0, 99], [3, 1], [[0.1, 1]], [["a", 1]],
        [[0.1, 1.5]], [[0.1, -1]], [[0.1, 1, 2]], [0.1], [[1e9, 0]] * 300, {"kind": "static"}, {"enabled": "yes"},
        list(range(40)), f"{TOKEN}{deep_text(rng.choice([17, 40, 600, 5000]))}", f"{TOKEN}[{','.join(['0'] * 3000)}]",
    ]
    # fmt: on


def _json_with_tokens(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    while TOKEN in text:
        start = text.index(f'"{TOKEN}')
        end = text.index('"', start + 1)
        text = text[:start] + json.loads(text[start : end + 1])[len(TOKEN) :] + text[end + 1 :]
    return text


def container(text: str, tensors: dict[str, np.ndarray], key: bytes | None = None) -> bytes:
    """A safetensors file with this metadata text and tensors, its checksum recomputed (and signed with `key`)."""
    digest = _checksum(text, tensors)
    metadata = {"dit_plan": text, "content_sha256": digest}
    if key is not None:
        metadata["content_hmac_sha256"] = _signature(digest, key)
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def split(plan: Plan) -> tuple[dict, dict[str, np.ndarray]]:
    data = plan_to_bytes(plan)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["dit_plan"])
    return meta, {k: np.array(v) for k, v in _canonical(plan)[1].items()}


def _slots(value, slots: list) -> list:
    """Every (container, key) pair of a JSON value, walked iteratively."""
    pending = [value]
    while pending:
        item = pending.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item)) if isinstance(item, list) else []
        for key in keys:
            slots.append((item, key))
            pending.append(item[key])
    return slots


def mutate_meta(meta: dict, rng: random.Random) -> None:
    container_, key = rng.choice(_slots(meta, []))
    choice = rng.random()
    if choice < 0.15 and isinstance(container_, dict):
        del container_[key]
    elif choice < 0.25 and isinstance(container_, dict):
        container_[rng.choice(["extra", "reuse", "kind", "size_height", "tightened", "simulated_runs"])] = rng.choice(
            hostile_values(rng)
        )
    else:
        container_[key] = rng.choice(hostile_values(rng))


def mutate_tensors(tensors: dict[str, np.ndarray], meta: dict, rng: random.Random) -> None:
    name = rng.choice(sorted(tensors))
    array = tensors[name]
    choice = rng.randrange(9)
    if choice == 0:
        tensors[name] = array.astype(
            rng.choice([np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_])
        )
    elif choice == 1:
        tensors[name] = np.resize(
            array, rng.choice([(0,), (1,), (BLOCKS + 1,), (STEPS, BLOCKS), (BLOCKS, STEPS + 1), (2, 2, 2, 2)])
        )
    elif choice == 2 and array.size:
        flat = array.copy().reshape(-1)
        values = [np.nan, np.inf, -1, 3, 255, 1e30, 0, 1, 2] if flat.dtype.kind == "f" else [0, 1, 2, 3, 7, 255]
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.size)] = np.array(rng.choice(values)).astype(flat.dtype)
        tensors[name] = flat.reshape(array.shape)
    elif choice == 3:
        del tensors[name]
    elif choice == 4:
        tensors[rng.choice(["smuggled", "arrays/smuggled", "sigmas"])] = np.zeros(STEPS)
    elif choice == 5:
        steps = rng.choice([10_001, 20_000])
        tensors["timesteps"] = np.linspace(999, 1, steps)
        if rng.random() < 0.5:
            tensors["actions"] = np.zeros((BLOCKS, steps), np.uint8)
        meta["num_inference_steps"] = steps
    elif choice == 6 and tensors.get("actions", np.empty(0)).shape == (BLOCKS, STEPS):
        cells = tensors["actions"].copy()
        cells[rng.randrange(BLOCKS), rng.randrange(1, STEPS)] = rng.choice([0, 1, 2])
        tensors["actions"] = cells
    elif choice == 7 and name.startswith("arrays/"):
        tensors[name] = (array * rng.choice([0.5, 2.0, -1.0, 1.0 + 1e-4])).astype(array.dtype)
    else:
        pca = rng.choice(["arrays/pca.3", "arrays/pca.0", "arrays/pca.9"])
        tensors[pca] = np.zeros(rng.choice([(2, 4, 5), (2, 4), (2, 4, 0), (1, 4, 1)]), np.float32)
        meta["arrays"] = (
            sorted({*meta.get("arrays", []), pca[len("arrays/") :]})
            if isinstance(meta.get("arrays"), list)
            else meta.get("arrays")
        )


def mutate_claims(meta: dict, rng: random.Random) -> None:
    predicted = meta.get("predicted")
    if not isinstance(predicted, dict):
        return
    key = rng.choice(["speedup", "compute_fraction"])
    if isinstance(predicted.get(key), (int, float)):
        predicted[key] = predicted[key] * rng.choice([1 + 1e-9, 1 + 1e-3, 0.5, 2.0]) + rng.choice([0.0, 1e-4])


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    name = rng.choice([k for k in header if k != "__metadata__"])
    choice = rng.randrange(6)
    if choice == 0:
        header[name]["dtype"] = rng.choice(["F16", "F64", "I64", "U8", "BOOL", "F32", "X9", 7])
    elif choice == 1:
        header[name]["shape"] = rng.choice([[2**40], [0, 2**40], [2**62, 2**62], [-1], [1.5], "4", [1] * 40])
    elif choice == 2:
        header[name]["data_offsets"] = rng.choice([[0, 2**62], [2**40, 2**40 + 8], [8, 0], [-8, 0], [0], None])
    elif choice == 3:
        header[f"{name}2"] = dict(header[name])
    elif choice == 4:
        header["__metadata__"]["content_hmac_sha256"] = rng.choice(["0" * 64, 7, ""])
    else:
        encoded = ('{"a":' + deep_text(rng.choice([20, 2000, 100_000])) + "}").encode()
        return len(encoded).to_bytes(8, "little") + encoded + body
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return data[: rng.randrange(len(data))]
    if choice == 1:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if choice == 2:
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return rng.choice([2**63, 2**40, len(data), 0, 100 << 20]).to_bytes(8, "little") + data[8:]


def make_case(bases: list[tuple[dict, dict]], rng: random.Random) -> tuple[bytes, bytes | None]:
    """(file bytes, key to load with) of one generated case."""
    meta, tensors = bases[rng.randrange(len(bases))]
    meta, tensors = json.loads(json.dumps(meta)), dict(tensors)
    family = rng.random()
    for _ in range(rng.randint(1, 2)):
        if family < 0.45:
            mutate_meta(meta, rng)
        elif family < 0.7:
            mutate_tensors(tensors, meta, rng)
        elif family < 0.8:
            mutate_claims(meta, rng)
    sign = rng.random() < 0.15
    key = KEY if sign and rng.random() < 0.7 else None
    data = container(
        _json_with_tokens(meta), tensors, key=rng.choice([KEY, b"another-key-0123456789"]) if sign else None
    )
    if 0.8 <= family < 0.9:
        data = mutate_header(data, rng)
    elif family >= 0.9:
        data = mutate_bytes(data, rng)
    return data, key


def check_loaded(plan: Plan) -> None:
    """What a loaded plan must satisfy: consistent, true claims, replayable, renderable, re-serialisable."""
    check_consistency(plan)
    for name, value in recomputed_claims(plan).items():
        if name in plan.predicted:
            assert math.isclose(plan.predicted[name], value, rel_tol=1e-5, abs_tol=1e-5), (
                name,
                plan.predicted[name],
                value,
            )
    assert plan_from_bytes(plan_to_bytes(plan)) == plan
    kind = plan.policy["kind"]
    if kind == "static" or kind in POLICIES:
        schedule = CompiledSchedule(plan, adaptive=kind in POLICIES)
        for steps in {plan.num_inference_steps, 2 * plan.num_inference_steps}:
            schedule.table(steps)
    if kind in POLICIES:
        replay_decisions(plan)
    text = render_report(plan_report(plan))
    assert all(c == "\n" or c.isprintable() for c in text), "control characters reach the terminal"
    json.dumps(plan_report(plan))
    _, size = profiled_generation(plan)
    assert math.prod(size.values()) <= MAX_VIDEO_VALUES


def replay_decisions(plan: Plan) -> None:
    """Drive the runtime's adaptive policy through two generations with random probe tensors, as replay does."""
    policy = POLICIES[plan.policy["kind"]](plan.policy, plan.num_blocks)
    generator = torch.Generator().manual_seed(0)
    steps = plan.num_inference_steps
    for _ in range(2):
        for step in range(steps):
            if not policy.begin_step("cond", step, steps):
                for block in sorted(policy.observed_blocks()):
                    hidden_in = torch.randn(1, 6, 4, generator=generator)
                    policy.observe("cond", block, hidden_in, hidden_in * 0.9, step, 2)
            policy.end_step("cond", step, steps)


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def test_generated_hostile_plans_load_correctly_or_are_refused_in_one_line():
    bases = [split(plan) for plan in base_plans()]
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    foreign, slowest = [], 0.0
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for index in range(CASES):
            data, key = make_case(bases, rng)
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                try:
                    plan = plan_from_bytes(data, source="case", key=key)
                except PlanError as exc:
                    message = str(exc)
                    assert message and "\n" not in message and len(message) < 400, message
                    outcomes["refused"] += 1
                else:
                    check_loaded(plan)
                    outcomes["loaded"] += 1
            except Exception as exc:  # anything but PlanError, or a loaded plan failing its checks
                foreign.append(f"case {index}: {type(exc).__name__}: {str(exc)[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - start)
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"plan fuzz: {CASES} cases, {outcomes}, foreign {len(foreign)}, slowest case {slowest * 1000:.0f} ms")
    assert not foreign, "\n".join(foreign[:20])
    assert outcomes["loaded"] > CASES // 20 and outcomes["refused"] > CASES // 2
    assert slowest < CASE_SECONDS


def test_every_base_plan_is_valid_and_survives_its_own_checks():
    for plan in base_plans():
        loaded = plan_from_bytes(plan_to_bytes(plan, key=KEY), key=KEY)
        assert loaded == plan
        check_loaded(loaded)


def test_large_plan_loads_within_the_stated_memory_bound(tmp_path):
    """A plan of 64 MiB (one large extra array) loads with a peak of at most 2× its size + 16 MiB (traced)."""
    plan = base_plans()[0]
    big = plan.with_changes(arrays={**plan.arrays, "blob": np.ones(16 << 20, np.float32)})
    path = save_plan(big, tmp_path / "big.plan")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        loaded = load_plan(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"large plan: {size / 2**20:.1f} MiB file, peak {peak / 2**20:.1f} MiB traced")
    assert loaded.arrays["blob"].shape == (16 << 20,)
    assert peak <= 2 * size + (16 << 20)


@pytest.mark.parametrize("kind", ["values", "depth", "characters"])
def test_oversized_metadata_is_refused_before_parsing(kind):
    meta, tensors = split(base_plans()[0])
    filler = {
        "values": f"{TOKEN}[{'[],' * 400_000}[]]",
        "depth": f"{TOKEN}{deep_text(100_000)}",
        "characters": "x" * (9 << 20),
    }[kind]
    meta["provenance"]["filler"] = filler
    data = container(_json_with_tokens(meta), tensors)
    tracemalloc.start()
    try:
        with pytest.raises(PlanError, match="values|nested|characters"):
            plan_from_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * len(data) + (16 << 20)


def test_more_steps_than_a_plan_may_hold_is_refused_before_allocating():
    meta, tensors = split(base_plans()[0])
    steps = 2_000_000
    tensors.update(timesteps=np.zeros(steps), actions=np.zeros((1, steps), np.uint8))
    meta["num_inference_steps"] = steps
    with pytest.raises(PlanError, match="more than a plan may hold"):
        plan_from_bytes(container(_json_with_tokens(meta), tensors))


def test_a_file_over_the_size_limit_is_refused_unread():
    class Huge(bytes):
        def __len__(self):
            return MAX_PLAN_BYTES + 1

    with pytest.raises(PlanError, match="larger than any plan"):
        plan_from_bytes(Huge(b"x"))
