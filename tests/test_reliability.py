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

from dit_accel.profiler.schema import (
    FIELDS,
    ProfileError,
    ProfileHeader,
    ProfileWriter,
    PromptInfo,
    open_profile,
    parts_folder,
)
from dit_accel.runtime import ModelFingerprint, Plan, PlanError
from dit_accel.runtime.plan import plan_from_bytes, plan_to_bytes

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

FUZZ_CASES = 1000
PER_CASE_SECONDS = 2.0
FP = ModelFingerprint("WanTransformer3DModel", "ab" * 32, ("blocks.0", "blocks.1", "blocks.2"))


def valid_plan() -> Plan:
    actions = np.zeros((3, 5), np.uint8)
    actions[1:, 2:4] = 1
    return Plan(
        model=FP,
        timesteps=np.linspace(999, 1, 5),
        sigmas=np.linspace(1, 0.01, 5),
        actions=actions,
        spans=((1, 3),),
        predicted={"speedup": 1.4},
        arrays={"pca.0": np.eye(4, 2, dtype=np.float32)[None]},
    )


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
        fingerprint=FP,
        settings={"num_inference_steps": steps},
        branches=("cond", "uncond"),
        grid=grid,
        adapter="wan",
        cfg_mode="separate",
        timesteps=np.linspace(999, 1, steps),
        sigmas=np.linspace(1, 0, steps),
        block_flops=np.full(blocks, 100, np.int64),
        block_seconds=np.full(blocks, 0.01),
        model_flops=400,
        model_seconds=0.04,
    )
    rng = np.random.default_rng(0)
    arrays = {
        name: rng.random((2, steps, blocks))
        for name in (
            "residual_rel_l1",
            "residual_cos",
            "output_rel_l1",
            "output_cos",
            "residual_norm",
            "output_norm",
            "motion",
        )
    }
    arrays.update(
        model_output_rel_l1=rng.random((2, steps)),
        attention_steps=np.arange(2),
        query_index=np.arange(4),
        attention_received=rng.random((2, blocks, *grid)),
        foreground=rng.integers(0, 2, grid),
        feature_queries=rng.random((blocks, 8, 2, 4)),
        feature_keys=rng.random((blocks, 8, 2, 4)),
    )
    ProfileWriter(path, header).add_prompts([(PromptInfo("p00000", 0, "a red circle", "", 0), arrays)])


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


# --- long runs and concurrency -------------------------------------------------------------------------------------


def _reuse_plan(pipe, steps: int = 4) -> Plan:
    from dit_accel.runtime import fingerprint_model

    actions = np.zeros((3, steps), np.uint8)
    actions[1:, 2] = 1
    return Plan(
        model=fingerprint_model(pipe.transformer),
        timesteps=np.linspace(999, 1, steps),
        actions=actions,
        spans=((1, 3),),
    )


def _hook_count(module) -> int:
    return sum(len(m._diffusers_hook.hooks) for m in module.modules() if hasattr(m, "_diffusers_hook"))


def test_two_hundred_generations_same_output_no_growth():
    import tracemalloc

    from conftest import PIPELINES, run_pipeline

    from dit_accel.runtime import apply_plan

    pipe = PIPELINES["wan"]()
    with apply_plan(pipe, _reuse_plan(pipe)) as handle:
        first = run_pipeline(pipe)
        hooks = _hook_count(pipe.transformer)
        run_pipeline(pipe)
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(198):
            assert np.array_equal(run_pipeline(pipe), first)
        growth = tracemalloc.get_traced_memory()[0] - baseline
        tracemalloc.stop()
        assert _hook_count(pipe.transformer) == hooks
        assert growth < 256 * 1024, f"Python heap grew by {growth} bytes over 198 generations"
        assert sum(handle.cache_bytes().values()) <= 2 * 3 * 4 * 4 * 16 * 4 * 2


def test_apply_and_remove_hundred_times_leaves_the_pipeline_as_fresh():
    from conftest import PIPELINES, run_pipeline

    from dit_accel.runtime import apply_plan

    pipe = PIPELINES["wan"]()
    fresh = run_pipeline(pipe)
    hooks = _hook_count(pipe.transformer)
    plan = _reuse_plan(pipe)
    for _ in range(100):
        apply_plan(pipe, plan).remove()
    assert _hook_count(pipe.transformer) == hooks
    assert np.array_equal(run_pipeline(pipe), fresh)
    fresh_weights = PIPELINES["wan"]().transformer.state_dict()
    for name, tensor in pipe.transformer.state_dict().items():
        assert np.array_equal(tensor.numpy(), fresh_weights[name].numpy()), name


def test_two_pipelines_with_different_plans_in_two_threads():
    import threading

    from conftest import PIPELINES, run_pipeline

    from dit_accel.runtime import apply_plan

    pipes = [PIPELINES["wan"](), PIPELINES["wan"]()]
    plans = [_reuse_plan(pipes[0]), _reuse_plan(pipes[1]).with_changes(actions=np.zeros((3, 4), np.uint8), spans=())]
    handles = [apply_plan(p, plan) for p, plan in zip(pipes, plans)]
    alone = [run_pipeline(p, seed=i) for i, p in enumerate(pipes)]
    results: list[list[np.ndarray]] = [[], []]

    def work(index: int) -> None:
        for _ in range(5):
            results[index].append(run_pipeline(pipes[index], seed=index))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for handle in handles:
        handle.remove()
    for index in range(2):
        assert all(np.array_equal(video, alone[index]) for video in results[index])
    assert not np.array_equal(alone[0], alone[1])


# --- crashes lose nothing ------------------------------------------------------------------------------------------

#: Kill moments, one drawn at random in each of this many equal slices of 0.5–6 s (start-up, first prompt, second
#: prompt, assembly): stratified, so five trials cover the phases that ten uniform draws did, in half the suite time.
KILL_TRIALS = 5


def test_profiler_killed_at_random_points_then_resumed_equals_uninterrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from dit_accel.harness.pipelines import load_pipeline
    from dit_accel.harness.prompts import read_prompt_file
    from dit_accel.profiler.recorder import RecordSettings
    from dit_accel.profiler.run import profile_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "a large red circle moves left on a blue background\na small green square moves up on a black background\n"
    )
    settings = RecordSettings(num_inference_steps=3, record_attention=False)
    pipe = load_pipeline(None)
    reference = tmp_path / "reference.h5"
    profile_prompts(pipe, read_prompt_file(prompts), reference, settings, progress=False)
    expected = open_profile(reference)
    rng = random.Random(7)
    states = []
    for trial in range(KILL_TRIALS):
        output = tmp_path / f"trial{trial}.h5"
        args = [
            sys.executable,
            "-m",
            "dit_accel.profiler",
            "--prompts",
            str(prompts),
            "-o",
            str(output),
            "--steps",
            "3",
            "--no-attention",
            "--quiet",
        ]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        width = 5.5 / KILL_TRIALS
        time.sleep(rng.uniform(0.5 + trial * width, 0.5 + (trial + 1) * width))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        shards = len(list(parts_folder(output).glob("p*.h5")))  # finished prompts not yet assembled
        states.append((len(open_profile(output).prompts) if output.exists() else -1, shards))
        if trial < KILL_TRIALS - 1:
            profile_prompts(pipe, read_prompt_file(prompts), output, settings, resume=True, progress=False)
        else:  # the last one resumes as a user would, through the CLI (in process), which says how much it skipped
            from click.testing import CliRunner

            from dit_accel.profiler.cli import main

            resume = CliRunner().invoke(main, [*args[3:], "--resume", "--json"])
            assert resume.exit_code == 0, resume.output
            finished = states[-1][0] if states[-1][0] >= 0 else states[-1][1]
            assert json.loads(resume.stdout)["prompts_skipped"] == finished
        resumed = open_profile(output)
        assert [p.index for p in resumed.prompts] == [0, 1]
        for name in ("residual_rel_l1", "motion", "feature_queries", "foreground", "model_output_rel_l1"):
            np.testing.assert_array_equal(resumed.stack(name), expected.stack(name))
        assert not list(tmp_path.glob(f".trial{trial}.h5.*"))
    print(f"(prompts in the file (-1: none yet), finished shards) when killed: {states}")


# --- plans from untrusted places: special files, hostile policies, terminal text, signatures ------------------------


def _within(seconds: float, call):
    """Run `call`, failing the test instead of hanging if it blocks (SIGALRM interrupts the blocking read)."""
    import signal

    def expire(signum, frame):
        pytest.fail(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero_link", "directory"])
def test_special_files_are_refused_without_reading(tmp_path, kind):
    import os

    from dit_accel.runtime import load_plan

    path = tmp_path / "x.plan"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero_link":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    start = time.perf_counter()
    with pytest.raises(PlanError, match="is not a regular file") as info:
        _within(5.0, lambda: load_plan(path))
    assert "\n" not in str(info.value) and time.perf_counter() - start < 1.0


HOSTILE_POLICIES = [
    {"codebook": [["a", 1]]},
    {"codebook": [[0.1, "2"]]},
    {"probe_block": 1.5},
    {"probe_block": "1"},
    {"moreg": {"enabled": True, "exponent": 8.0, "gradient_scale": 10.0, "active": [0.0, 1.0]}},
    {"moreg": {"enabled": True, "norm": 0.0, "exponent": 8.0, "gradient_scale": 10.0, "active": [0.0, 1.0]}},
    {"moreg": {"enabled": True, "norm": 0.3, "exponent": -2.0, "gradient_scale": 10.0, "active": [0.0, 1.0]}},
    {"moreg": {"enabled": True, "norm": 0.3, "exponent": 8.0, "gradient_scale": 10.0, "active": "01"}},
    {"kind": "bwcache", "threshold": 0.3, "reuse_steps": 2, "indicator_blocks": [0, 2], "refresh_every": 0},
    {"kind": "bwcache", "threshold": 0.3, "reuse_steps": 2, "indicator_blocks": [0, 2], "refresh_every": "4"},
    {"kind": "bwcache", "threshold": "low", "reuse_steps": 2, "indicator_blocks": [0, 2], "refresh_every": 4},
    {"kind": "bwcache", "threshold": 0.3, "reuse_steps": 2, "indicator_blocks": [9], "refresh_every": 4},
]


def _adaptive_plan(model, **policy) -> Plan:
    from dit_accel.runtime import fingerprint_model

    base = {
        "kind": "adacache",
        "probe_block": 1,
        "codebook": [[0.5, 2], [1e9, 0]],
        "protect_first": 1,
        "protect_last": 1,
        "moreg": {"enabled": True, "norm": 0.3, "exponent": 8.0, "gradient_scale": 10.0, "active": [0.0, 1.0]},
    }
    if policy.get("kind") == "bwcache":
        base = {"protect_first": 1, "protect_last": 1}
    fingerprint = fingerprint_model(model)
    return Plan(
        model=fingerprint,
        timesteps=np.linspace(999, 1, 6),
        actions=np.zeros((3, 6), np.uint8),
        policy={**base, **policy},
    )


@pytest.mark.parametrize("hostile", HOSTILE_POLICIES, ids=range(len(HOSTILE_POLICIES)))
def test_hostile_policy_parameters_are_refused_before_any_hook(hostile):
    from diffusers.hooks import HookRegistry
    from tiny_models import run_steps, tiny_wan

    from dit_accel.runtime import apply_plan

    model = tiny_wan().eval()
    with apply_plan(model, _adaptive_plan(model)):  # the valid policy replays: the refusals below are the checks'
        run_steps(model, "wan", [950.0, 800.0, 600.0, 400.0, 200.0, 50.0])
    with pytest.raises(PlanError) as info:
        apply_plan(model, _adaptive_plan(model, **hostile))
    assert "\n" not in str(info.value)
    modules = [model, *model.blocks]
    assert all(not HookRegistry.check_if_exists_or_initialize(m).hooks for m in modules), "a hook was left installed"
    with pytest.raises(TypeError, match="read-only"):
        _adaptive_plan(model).policy["moreg"]["norm"] = 0.0


def _rewrite_plan_file(data: bytes, edit) -> bytes:
    """A forger's edit: change the metadata and tensors of a plan file, then recompute its checksum."""
    from safetensors.numpy import load, save

    from dit_accel.runtime.plan import _checksum

    length = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + length])["__metadata__"]["dit_plan"])
    tensors = dict(load(data))
    edit(meta, tensors)
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return save(tensors, metadata={"dit_plan": text, "content_sha256": _checksum(text, tensors)})


def test_reschedule_with_recomputed_checksum_keeping_the_claims_is_refused():
    from pathlib import Path

    data = (Path(__file__).parent.parent / "plans" / "default-auto-2x.plan").read_bytes()

    def reuse_everything_after_warmup(meta, tensors):
        actions = tensors["actions"].copy()
        actions[:, 2:-1] = 1
        tensors["actions"] = actions

    with pytest.raises(PlanError, match=r"claims compute fraction 0.48 but its schedule computes 0\.0\d.*refit"):
        plan_from_bytes(_rewrite_plan_file(data, reuse_everything_after_warmup))


@pytest.fixture(scope="module")
def synthetic_profile(tmp_path_factory) -> str:
    from dit_accel.planner.synthetic import write_synthetic_profile

    return write_synthetic_profile(tmp_path_factory.mktemp("reliability") / "synthetic.h5")


def _dit_plan(*args):
    from click.testing import CliRunner

    from dit_accel.planner.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_escapes_control_characters_from_the_plan(synthetic_profile, tmp_path):
    from dit_accel.runtime import load_plan, save_plan

    fitted = tmp_path / "fitted.plan"
    assert _dit_plan("fit", synthetic_profile, "-o", fitted).exit_code == 0
    plan = load_plan(fitted)
    hostile = plan.with_changes(
        model=ModelFingerprint(
            plan.model.transformer_class,
            plan.model.config_hash,
            ("blocks.0\x1b]0;owned\x07", *plan.model.block_ids[1:]),
        ),
        provenance={**plan.provenance, "method": "auto\x1b[2J\r", "tightened": {"note": "\u202eevil"}},
    )
    path = save_plan(hostile, tmp_path / "hostile.plan")
    result = _dit_plan("inspect", path)
    assert result.exit_code == 0, result.output
    assert not any(c in result.stdout for c in "\x1b\x07\r\u202e")
    assert "blocks.0\\x1b]0;owned\\x07" in result.stdout and "auto\\x1b[2J\\r" in result.stdout
    spoofed = _rewrite_plan_file(path.read_bytes(), lambda meta, _: meta["model"]["block_ids"].append("x\x1b[31m"))
    (tmp_path / "spoofed.plan").write_bytes(spoofed)
    result = _dit_plan("inspect", tmp_path / "spoofed.plan")
    assert result.exit_code == 2 and "\x1b" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_signing_key_options(synthetic_profile, tmp_path):
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    other.write_bytes(b"fedcba9876543210fedcba9876543210\n")
    signed, unsigned = tmp_path / "signed.plan", tmp_path / "unsigned.plan"
    assert _dit_plan("fit", synthetic_profile, "-o", signed, "--sign-key-file", key).exit_code == 0
    assert _dit_plan("fit", synthetic_profile, "-o", unsigned).exit_code == 0
    result = _dit_plan("inspect", signed, "--key-file", key, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["signature"] == "verified"
    assert _dit_plan("inspect", signed).exit_code == 0 and _dit_plan("inspect", unsigned).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves left on a black background\n")
    for plan, key_file, words in [(unsigned, key, "not signed"), (signed, other, "does not match the key")]:
        for command in (("inspect", plan), ("validate", plan, "--prompts", prompts, "--model", tmp_path / "no-model")):
            result = _dit_plan(*command, "--key-file", key_file)
            assert result.exit_code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    result = _dit_plan("fit", synthetic_profile, "-o", tmp_path / "never.plan", "--sign-key-file", short)
    assert result.exit_code == 2 and "at least 16" in result.stderr and not (tmp_path / "never.plan").exists()
