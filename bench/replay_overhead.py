"""Replay overhead and caching speedup of the runtime on a CPU-sized Wan transformer.

Times, interleaved in one process, a denoising loop of a random-weight Wan transformer (8 blocks, dim 128,
1,024 tokens) three ways: vanilla, with an all-compute plan (hook overhead; target ratio <= 1.03), and with a plan
that reuses half of the block calls (measured speedup against the FLOP-predicted speedup; target >= 0.9 of it).
Prints medians of repeats and ratios, never a single absolute time as the result.

    python -m dit_accel.bench.replay_overhead [--repeats 7] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from dit_accel.profiler.flops import count_flops
from dit_accel.runtime import REUSE, Plan, apply_plan, fingerprint_model


def build_model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=64,
        freq_dim=64,
        ffn_dim=512,
        num_layers=8,
        rope_max_seq_len=64,
    ).eval()


def denoise(model: torch.nn.Module, latent: torch.Tensor, text: torch.Tensor, steps: int) -> torch.Tensor:
    """A plain Euler loop over `steps` calls, each inside the "cond" cache context like WanPipeline's."""
    timesteps = torch.linspace(999, 1, steps)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            with model.cache_context("cond", step_index=i, num_inference_steps=steps):
                velocity = model(hidden_states=latent, timestep=t[None], encoder_hidden_states=text, return_dict=False)[
                    0
                ]
            latent = latent - velocity / steps
    return latent


def half_reuse_plan(model: torch.nn.Module, steps: int) -> Plan:
    """Every block reused on every odd step: half of all block calls, one span over the whole stack."""
    fingerprint = fingerprint_model(model)
    actions = np.zeros((len(fingerprint.block_ids), steps), np.uint8)
    actions[:, 1::2] = REUSE
    return Plan(
        model=fingerprint, timesteps=np.linspace(999, 1, steps), actions=actions, spans=((0, actions.shape[0]),)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model()
    latent, text = torch.randn(1, 4, 4, 32, 32), torch.randn(1, 16, 64)
    plans = {
        "all-compute plan": Plan.all_compute(fingerprint_model(model), np.linspace(999, 1, args.steps)),
        "half-reuse plan": half_reuse_plan(model, args.steps),
    }

    def run(variant: str) -> float:
        handle = apply_plan(model, plans[variant]) if variant in plans else None
        start = time.perf_counter()
        denoise(model, latent, text, args.steps)
        elapsed = time.perf_counter() - start
        if handle is not None:
            handle.remove()
        return elapsed

    variants = ["vanilla", *plans]
    run("vanilla")  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(run(variant))
    medians = {v: statistics.median(t) for v, t in times.items()}

    full_flops, _ = count_flops(lambda: denoise(model, latent, text, args.steps))
    with apply_plan(model, plans["half-reuse plan"]):
        plan_flops, _ = count_flops(lambda: denoise(model, latent, text, args.steps))
    predicted = full_flops / plan_flops
    measured = medians["vanilla"] / medians["half-reuse plan"]
    overhead = medians["all-compute plan"] / medians["vanilla"]

    tokens = 4 * 16 * 16
    print(
        f"Wan transformer: 8 blocks, dim 128, {tokens} tokens, {args.steps} steps, median of {args.repeats} "
        f"interleaved repeats, {torch.get_num_threads()} thread(s)"
    )
    print("| variant | median time ratio vs vanilla | target |")
    print("|---|---|---|")
    print(f"| all-compute plan (overhead) | {overhead:.3f} | <= 1.03 |")
    print(
        f"| half-reuse plan (speedup) | {measured:.2f}x (FLOP-predicted {predicted:.2f}x, {measured / predicted:.2f} "
        "of it) | >= 0.90 of predicted |"
    )


if __name__ == "__main__":
    main()
