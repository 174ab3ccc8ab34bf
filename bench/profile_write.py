"""Cost of writing a profile prompt by prompt: bytes written to disk and time, for N = 1, 10, 50 prompts.

Each prompt carries realistic fields (the recorder's shapes for 30 blocks, 50 steps, CFG, attention maps every 4th
step on a 4×12×16 token grid, 32 q/k samples of 8 heads × 64 channels; random values, which compress like real
ones: about 3.7 MB per prompt) and goes through the real writer the way `dit-profile` uses it: `add_prompt` per
prompt, `finish` at the end. The sizes run one after another in one process, so their per-prompt costs compare
side by side; a linear writer keeps the ratio per-prompt(N=50) / per-prompt(N=1) near 1 (target <= 1.3).

Bytes come from /proc/self/io `write_bytes` (what this process sent to the storage layer), else from the sizes of
the files written.

    python -m dit_accel.bench.profile_write [--counts 1,10,50] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dit_accel.profiler.schema import ProfileHeader, ProfileWriter, PromptInfo, parts_folder, prompt_key
from dit_accel.runtime.plan import ModelFingerprint

FULL = {"blocks": 30, "steps": 50, "grid": (4, 12, 16), "samples": 32, "queries": 64, "text": 16}
SMOKE = {"blocks": 4, "steps": 8, "grid": (2, 4, 4), "samples": 8, "queries": 8, "text": 4}
LAGS, HEADS, CHANNELS, ATTENTION_EVERY = 17, 8, 64, 4


def _header(shape: dict) -> ProfileHeader:
    blocks, steps = shape["blocks"], shape["steps"]
    return ProfileHeader(
        fingerprint=ModelFingerprint("WanTransformer3DModel", "0" * 64, tuple(f"blocks.{b}" for b in range(blocks))),
        settings={"num_inference_steps": steps, "bench": "profile_write"},
        branches=("cond", "uncond"),
        grid=shape["grid"],
        adapter="wan",
        cfg_mode="separate",
        timesteps=np.linspace(999.0, 0.0, steps),
        sigmas=np.linspace(1.0, 0.0, steps),
        block_flops=np.full(blocks, 10**9, np.int64),
        block_seconds=np.full(blocks, 1e-2),
        model_flops=blocks * 10**9,
        model_seconds=blocks * 1e-2,
    )


def prompt_arrays(shape: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One prompt's fields, in the recorder's shapes and dtypes, with values in each field's range."""
    blocks, steps, grid = shape["blocks"], shape["steps"], shape["grid"]
    attention_steps = np.arange(0, steps, ATTENTION_EVERY, dtype=np.int32)
    drift = {
        name: rng.random((2, steps, blocks), np.float32)
        for name in ("residual_rel_l1", "residual_cos", "output_rel_l1", "output_cos", "residual_norm", "output_norm")
    }
    features = (blocks, shape["samples"], HEADS, CHANNELS)
    return {
        **drift,
        "motion": rng.random((2, steps, blocks), np.float32),
        "model_output_rel_l1": rng.random((2, steps), np.float32),
        "attention_steps": attention_steps,
        "attention_received": rng.random((len(attention_steps), blocks, *grid), np.float32),
        "query_index": np.sort(rng.choice(int(np.prod(grid)), shape["queries"], replace=False)).astype(np.int32),
        "cross_attention": rng.random((len(attention_steps), blocks, shape["queries"], shape["text"]), np.float32),
        "foreground": rng.integers(0, 2, grid, dtype=np.uint8),
        "feature_queries": rng.standard_normal(features, np.float32),
        "feature_keys": rng.standard_normal(features, np.float32),
        "reuse_gram": rng.random((2, steps, LAGS, LAGS), np.float32),
        "stack_output_sq": rng.random((2, steps), np.float32),
    }


def _written_bytes() -> int | None:
    """Bytes this process has sent to the storage layer, or None where /proc/self/io does not say."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if ": " in line)
        return int(fields["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def write_profile(out: Path, count: int, shape: dict, pool: list[dict[str, np.ndarray]]) -> dict:
    """Write `count` prompts to the new file `out` as dit-profile does; returns bytes written, seconds and the
    source of the bytes."""
    written, created = _written_bytes(), 0
    start = time.perf_counter()
    with ProfileWriter(out, _header(shape)) as writer:
        for index in range(count):
            writer.add_prompt(PromptInfo(prompt_key(index), index, f"prompt {index}", "", index), pool[index % 3])
            created += (parts_folder(out) / f"{prompt_key(index)}.h5").stat().st_size
    seconds = time.perf_counter() - start
    created += out.stat().st_size
    after = _written_bytes()
    measured = after - written if written is not None and after is not None and after > written else None
    return {
        "prompts": count,
        "bytes": measured if measured is not None else created,
        "bytes_source": "write_bytes" if measured is not None else "file sizes",
        "file_bytes": out.stat().st_size,
        "seconds": seconds,
        "seconds_per_prompt": seconds / count,
    }


def measure(counts: list[int], smoke: bool = False) -> list[dict]:
    """One row per count, measured one after another in this process (same prompt data for every count)."""
    shape = SMOKE if smoke else FULL
    pool = [prompt_arrays(shape, np.random.default_rng(seed)) for seed in range(3)]
    with tempfile.TemporaryDirectory(prefix="profile_write.") as folder:
        write_profile(Path(folder) / "warm-up.h5", 1, shape, pool)  # imports, HDF5's first file
        return [write_profile(Path(folder) / f"n{count}.h5", count, shape, pool) for count in counts]


def render(rows: list[dict]) -> str:
    lines = [
        "| prompts | bytes written | bytes per prompt | file bytes | seconds | s per prompt |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['prompts']} | {row['bytes'] / 1e6:.1f} MB | {row['bytes'] / row['prompts'] / 1e6:.2f} MB | "
            f"{row['file_bytes'] / 1e6:.1f} MB | {row['seconds']:.2f} | {row['seconds_per_prompt']:.3f} |"
        )
    first, last = rows[0], rows[-1]
    time_ratio = last["seconds_per_prompt"] / first["seconds_per_prompt"]
    byte_ratio = (last["bytes"] / last["prompts"]) / (first["bytes"] / first["prompts"])
    lines.append(
        f"\nper prompt, N={last['prompts']} vs N={first['prompts']}: time {time_ratio:.2f}x, bytes {byte_ratio:.2f}x "
        f"(target <= 1.3x); bytes from {first['bytes_source']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,50", help="comma-separated prompt counts")
    parser.add_argument("--smoke", action="store_true", help="tiny prompts (for tests)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = measure([int(c) for c in args.counts.split(",")], smoke=args.smoke)
    print(json.dumps(rows, indent=2) if args.json else render(rows))


if __name__ == "__main__":
    main()
