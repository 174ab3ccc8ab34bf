"""Profiling cost and profile size on the default model, and the size projected for Wan2.1-1.3B at 480p.

Runs, interleaved in one process, plain generation and profiling of the same prompts at default settings
(50 steps, guidance 5), and prints the time ratio (target <= 1.5) without and with the one-time step-sensitivity
pass (one reference and `sensitivity_steps` replayed generations of the first prompt, so its share falls as the
calibration set grows), the measured profile size per prompt against
the schema's uncompressed estimate, and the projection for Wan2.1-T2V-1.3B at 480p x 81 frames x 50 steps
(target < 200 MB per prompt).

    python -m dit_accel.bench.profile_budget [--prompts 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dit_accel.harness.captions import CALIBRATION
from dit_accel.harness.pipelines import generate, load_pipeline
from dit_accel.harness.prompts import PromptSpec
from dit_accel.profiler.budget import WAN_1_3B_480P, ModelShape, bytes_per_prompt
from dit_accel.profiler.recorder import RecordSettings
from dit_accel.profiler.run import profile_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(None)
    specs = [PromptSpec(p, "", i) for i, p in enumerate(CALIBRATION[: args.prompts])]
    settings = RecordSettings()
    per_prompt = dataclasses.replace(settings, sensitivity_steps=0)
    plain, profiled, recorded_only, sizes = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                for spec in specs:
                    generate(pipe, spec, settings.num_inference_steps, settings.guidance_scale, {})
            plain.append(time.perf_counter() - start)
            output = Path(folder) / f"r{repeat}.h5"
            start = time.perf_counter()
            profile_prompts(pipe, specs, output, settings, progress=False)
            profiled.append(time.perf_counter() - start)
            sizes.append(output.stat().st_size / len(specs))
            start = time.perf_counter()
            profile_prompts(pipe, specs, Path(folder) / f"n{repeat}.h5", per_prompt, progress=False)
            recorded_only.append(time.perf_counter() - start)
    transformer = pipe.transformer
    config = transformer.config
    default_shape = ModelShape(
        blocks=config.num_layers,
        grid=(8, 8, 8),
        heads=config.num_attention_heads,
        head_dim=config.attention_head_dim,
        text_tokens=pipe.tokenizer.max_length,
        video_bytes=8 * 32 * 32 * 3,
    )
    estimate = sum(bytes_per_prompt(default_shape, settings).values())
    projected = bytes_per_prompt(WAN_1_3B_480P, settings)
    ratio = statistics.median(recorded_only) / statistics.median(plain)
    with_sensitivity = statistics.median(profiled) / statistics.median(plain)
    print(
        f"default model, {len(specs)} prompts, {settings.num_inference_steps} steps, median of {args.repeats} "
        f"interleaved repeats, {torch.get_num_threads()} thread(s)"
    )
    print("| quantity | value | target |")
    print("|---|---|---|")
    print(
        f"| profiling time / plain generation time (cost pass included, no sensitivity pass) | {ratio:.2f} | <= 1.5 |"
    )
    print(
        f"| the same with the step-sensitivity pass ({settings.sensitivity_steps} steps, first prompt, one-time) | "
        f"{with_sensitivity:.2f} | |"
    )
    print(
        f"| profile size per prompt, default model (compressed file) | {statistics.median(sizes) / 1e6:.2f} MB "
        f"(schema estimate uncompressed {estimate / 1e6:.2f} MB) | |"
    )
    print(
        "| projected per prompt, Wan2.1-1.3B 480p x 81f x 50 steps (uncompressed) | "
        f"{sum(projected.values()) / 1e6:.1f} MB | < 200 MB |"
    )
    print(
        "projection by field (MB):",
        ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(projected.items(), key=lambda kv: -kv[1]) if v > 1e5),
    )


if __name__ == "__main__":
    main()
