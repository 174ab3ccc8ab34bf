"""One-call benchmark suite of the production path at real scale, written to `docs/benchmarks.md`.

    python -m dit_accel.bench.gpu_suite [--smoke] [--out docs/benchmarks.md] [--rows overhead,plans,...]

Full size (the default): Wan2.1-T2V-1.3B's architecture (`bench.models.WAN_1_3B_CONFIG`, 30 blocks, width 1536) with
random weights (seed 0) at 480×832 and 17 frames (7,800 tokens, sized so that every row fits one 10-minute call on an
H100-class GPU; `--frames 81` gives 32,760 tokens), 20 steps, CFG 5 with separate cond/uncond calls as WanPipeline
makes them, bfloat16 on CUDA (float32 elsewhere), `torch.cuda.synchronize` around every timing. Random weights make
speed meaningful and fidelity meaningless, so the suite measures speed and memory only. `--smoke` runs the same rows
on a 2-block Wan of width 64 at 64×64 × 5 frames, 4 steps, on one CPU thread in seconds (the test suite runs it).
The page is rewritten after every row, so a run cut short keeps the rows it finished.

Rows (`--rows` picks a subset; each row runs in its own try/except, so a failure is one line in the table and the
other rows still run):

* `overhead` — a denoising loop with an all-compute plan against the vanilla loop (interleaved medians).
* `plans` — whole-stack static plans at 1.5/2/2.5× (a reuse schedule over the steps, built directly: computed steps
  spread evenly, first and last computed): wall speedup against the FLOP-predicted speedup.
* `peers` — diffusers' FirstBlockCache and MagCache (configured as `bench/peers.py` does, MagCache calibrated by
  diffusers' own mode on this model), each against a static plan that computes the same number of block calls.
* `compile` — `torch.compile` of the transformer with a 2× plan against eager with the same plan (inductor; the
  smoke run uses the `eager` backend, which traces the same graphs without generating code).
* `pruned_attention` — full against pruned attention at the model's token count (12 heads of 128, PCA rank 15 as
  the runtime pads it): the SDPA kernel each form gets and the time ratio.
* `cache_memory` — bytes of cached residuals after a 2× plan's generation: measured (`handle.cache_bytes()`) and as
  `dit-plan inspect` predicts them (`planner.summary.cache_memory`).
* `profiling` — `dit-profile`'s `profile_prompts` on two prompts (random prompt embeddings through a pipeline
  wrapper, since the random model has no text encoder): seconds and bytes per prompt.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_accel.harness.prompts import PromptSpec
from dit_accel.runtime import REUSE, Plan, apply_plan, fingerprint_model
from dit_accel.runtime.pruning import interleaved_medians, time_pruned_attention

from .models import WAN_1_3B_CONFIG, WAN_TEXT_TOKENS

#: In running order: cheap rows first, torch.compile (minutes of compiling at full size) last.
ROWS = ("overhead", "plans", "pruned_attention", "cache_memory", "peers", "profiling", "compile")
#: Rows whose numbers only mean something on a GPU (on CPU they run, but measure the wrong machine).
GPU_ROWS = {"plans", "peers", "compile", "pruned_attention"}
SPEEDUPS = (1.5, 2.0, 2.5)
GUIDANCE = 5.0
SMOKE_CONFIG: dict[str, Any] = {
    **WAN_1_3B_CONFIG,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}


@dataclass(frozen=True)
class SuiteSize:
    """Model config, video size (pixels), steps, text embedding shape, timing repeats and the compile backend."""

    name: str
    config: dict[str, Any]
    frames: int
    height: int
    width: int
    steps: int
    text_tokens: int
    repeats: int
    compile_backend: str
    vae_base_dim: int

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(1, channels, latent frames, latent height, latent width): Wan's VAE compresses 4× in time, 8× in space."""
        return (1, self.config["in_channels"], (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def tokens(self) -> int:
        _, _, frames, height, width = self.latent_shape
        patch = self.config["patch_size"]
        return frames // patch[0] * (height // patch[1]) * (width // patch[2])

    @property
    def hidden(self) -> int:
        return self.config["num_attention_heads"] * self.config["attention_head_dim"]


FULL = SuiteSize("wan-1.3b", WAN_1_3B_CONFIG, 17, 480, 832, 20, WAN_TEXT_TOKENS, 3, "inductor", 96)
SMOKE = SuiteSize("smoke", SMOKE_CONFIG, 5, 64, 64, 4, 16, 2, "eager", 16)


@dataclass
class Row:
    """One line of the table: what was measured, the result, and how to read it."""

    name: str
    measurement: str
    result: str
    note: str = ""
    seconds: float = 0.0


class Suite:
    """The random-weight transformer, its inputs, and the denoising loop every row times."""

    def __init__(self, size: SuiteSize, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import WanTransformer3DModel

        self.size, self.device, self.dtype = size, device, dtype
        torch.manual_seed(0)
        with torch.device(device):
            self.transformer = WanTransformer3DModel(**size.config).to(dtype).eval()
        generator = torch.Generator(device="cpu").manual_seed(0)
        text_shape = (1, size.text_tokens, size.config["text_dim"])
        self.latent = torch.randn(size.latent_shape, generator=generator).to(device, dtype)
        self.cond, self.uncond = (torch.randn(text_shape, generator=generator).to(device, dtype) for _ in range(2))
        self.fingerprint = fingerprint_model(self.transformer)
        self.timesteps = np.linspace(999.0, 1.0, size.steps)

    @property
    def blocks(self) -> int:
        return len(self.fingerprint.block_ids)

    def denoise(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The steps of a CFG generation as WanPipeline makes them: a cond and an uncond call per step."""
        model = model if model is not None else self.transformer
        latent, steps = self.latent, self.size.steps
        with torch.no_grad():
            for step, t in enumerate(self.timesteps):
                timestep = torch.tensor([t], device=self.device)
                velocities = []
                for branch, text in (("cond", self.cond), ("uncond", self.uncond)):
                    with self.transformer.cache_context(branch, step_index=step, num_inference_steps=steps):
                        velocities.append(
                            model(
                                hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False
                            )[0]
                        )
                cond, uncond = velocities
                latent = latent - (uncond + GUIDANCE * (cond - uncond)) / steps
        return latent

    def timed(self, variants: dict[str, Callable[[], Any]]) -> dict[str, float]:
        """Interleaved medians of the variants over the size's repeats (synchronised on CUDA)."""
        return interleaved_medians(variants, self.size.repeats, self.device)

    def reuse_plan(self, speedup: float, computed: int | None = None) -> Plan:
        """A whole-stack static plan computing `computed` steps (default: steps / speedup), spread evenly, first
        and last included; the other steps reuse the stack as one span."""
        steps = self.size.steps
        computed = max(2, min(steps, computed if computed is not None else round(steps / speedup)))
        actions = np.full((self.blocks, steps), REUSE, np.uint8)
        actions[:, np.unique(np.round(np.linspace(0, steps - 1, computed)).astype(int))] = 0
        provenance = {
            "tokens": self.size.tokens,
            "hidden": self.size.hidden,
            "profile_settings": {"guidance_scale": GUIDANCE},
        }
        return Plan(
            model=self.fingerprint,
            timesteps=self.timesteps,
            actions=actions,
            spans=((0, self.blocks),),
            provenance=provenance,
        )

    @cached_property
    def call_flops(self) -> tuple[float, float]:
        """(FLOPs of all blocks, FLOPs of the rest) of one transformer call."""
        from dit_accel.profiler.flops import count_flops

        timestep = torch.tensor([500.0], device=self.device)
        with torch.no_grad():
            total, per_module = count_flops(
                lambda: self.transformer(
                    hidden_states=self.latent, timestep=timestep, encoder_hidden_states=self.cond, return_dict=False
                )
            )
        blocks = sum(v for name, v in per_module.items() if name.rsplit(".", 2)[-2:-1] == ["blocks"])
        return float(blocks), float(total - blocks)

    def flop_speedup(self, plan: Plan) -> float:
        """Full FLOPs over the plan's FLOPs (reused block calls cost nothing, the rest of a call always runs)."""
        blocks, other = self.call_flops
        computed = float(np.sum(plan.actions != REUSE)) / self.blocks
        steps = plan.actions.shape[1]
        return steps * (blocks + other) / (computed * blocks + steps * other)


def with_plan(suite: Suite, plan: Plan, model: torch.nn.Module | None = None) -> Callable[[], Any]:
    """A callable that runs one generation with `plan` applied."""

    def run() -> Any:
        with apply_plan(suite.transformer, plan):
            return suite.denoise(model)

    return run


def row_overhead(suite: Suite) -> list[Row]:
    plan = Plan.all_compute(suite.fingerprint, suite.timesteps)
    times = suite.timed({"vanilla": suite.denoise, "all-compute plan": with_plan(suite, plan)})
    ratio = times["all-compute plan"] / times["vanilla"]
    return [
        Row(
            "overhead",
            "all-compute plan / vanilla, median wall time",
            f"{ratio:.3f}",
            "target <= 1.02 at real sizes; the smoke model's calls are mostly Python, so hooks weigh more there",
        )
    ]


def row_plans(suite: Suite) -> list[Row]:
    plans = {s: suite.reuse_plan(s) for s in SPEEDUPS}
    times = suite.timed({"vanilla": suite.denoise, **{f"{s}x": with_plan(suite, p) for s, p in plans.items()}})
    return [
        Row(
            f"plans {s}x",
            "whole-stack static plan: wall speedup (FLOP-predicted)",
            f"{times['vanilla'] / times[f'{s}x']:.2f}x ({suite.flop_speedup(plan):.2f}x)",
            f"{int(np.sum(plan.actions[0] != REUSE))} of {suite.size.steps} steps computed",
        )
        for s, plan in plans.items()
    ]


def count_block_calls(suite: Suite, run: Callable[[], Any]) -> int:
    """Blocks computed during `run` (counted on each block's feed-forward, which a skipped block never reaches)."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    handles = [block.ffn.register_forward_pre_hook(count) for block in suite.transformer.blocks]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls[0]


def row_peers(suite: Suite) -> list[Row]:
    from .peers import calibrate_mag_ratios, peer_enabled, peer_settings

    steps = suite.size.steps
    full_calls = 2 * steps * suite.blocks
    spec = PromptSpec("random embeddings")
    ratios = calibrate_mag_ratios(suite.transformer, lambda _: suite.denoise(), [spec], steps)["mag_ratios"]
    rows = []
    for name, value in (("fbc", 0.15), ("magcache", 0.12)):
        settings = peer_settings(
            name, value, suite.transformer, steps, mag_ratios=ratios if name == "magcache" else None
        )

        def peer_run(settings: dict[str, Any] = settings) -> Any:
            with peer_enabled(suite.transformer, settings):
                return suite.denoise()

        calls = count_block_calls(suite, peer_run)
        matched = suite.reuse_plan(1.0, computed=max(2, round(steps * calls / full_calls)))
        times = suite.timed({"vanilla": suite.denoise, name: peer_run, "plan": with_plan(suite, matched)})
        plan_calls = count_block_calls(suite, with_plan(suite, matched))
        rows.append(
            Row(
                f"peers {name}",
                f"{name} (threshold {value}) vs static plan at matched block calls: wall speedup",
                f"{name} {times['vanilla'] / times[name]:.2f}x at {full_calls / calls:.2f}x fewer block calls; plan "
                f"{times['vanilla'] / times['plan']:.2f}x at {full_calls / plan_calls:.2f}x",
                "random weights: which steps a peer skips says nothing about a trained model",
            )
        )
    return rows


def row_compile(suite: Suite) -> list[Row]:
    plan = suite.reuse_plan(2.0)
    compiled = torch.compile(suite.transformer, backend=suite.size.compile_backend)
    with apply_plan(suite.transformer, plan):  # one handle: new hooks per run would recompile per run
        start = time.perf_counter()
        compiled_out = suite.denoise(compiled)
        first = time.perf_counter() - start
        times = suite.timed({"eager": suite.denoise, "compiled": lambda: suite.denoise(compiled)})
        eager_out = suite.denoise()
    error = float((compiled_out.float() - eager_out.float()).abs().max())
    return [
        Row(
            "compile",
            f"torch.compile ({suite.size.compile_backend}) with a 2x plan: eager / compiled median wall time",
            f"{times['eager'] / times['compiled']:.2f}x",
            f"first generation (compiling) {first:.1f} s; max abs(compiled - eager) {error:.2e}",
        )
    ]


def row_pruned_attention(suite: Suite) -> list[Row]:
    config = suite.size.config
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    rank = min(15, head_dim - 1)
    cpu = suite.device.type != "cuda"
    timing = time_pruned_attention(
        suite.size.tokens if not cpu else max(suite.size.tokens, 2048),
        heads,
        head_dim,
        rank,
        suite.device,
        suite.dtype,
        repeats=max(3, suite.size.repeats),
        query_tokens=512 if cpu else None,
    )
    return [
        Row(
            "pruned_attention",
            f"pruned / full attention time (rank {rank} run at {timing['kernel_rank']} of {head_dim})",
            f"{timing['ratio']:.2f}",
            f"kernels: full {timing['backend_full']}, pruned {timing['backend_pruned']}; below 1 pays",
        )
    ]


def row_cache_memory(suite: Suite) -> list[Row]:
    from dit_accel.planner.summary import cache_memory

    plan = suite.reuse_plan(2.0)
    before = torch.cuda.memory_allocated(suite.device) if suite.device.type == "cuda" else None
    with apply_plan(suite.transformer, plan) as handle:
        suite.denoise()
        measured = sum(handle.cache_bytes().values())
        allocated = torch.cuda.memory_allocated(suite.device) - before if before is not None else None
    predicted = cache_memory(plan, None, None, torch.tensor([], dtype=suite.dtype).element_size())["bytes"]
    extra = "" if allocated is None else f"; CUDA memory held after the run {_size(allocated)}"
    return [
        Row(
            "cache_memory",
            "cached residual bytes after a 2x plan's generation: measured (predicted by dit-plan inspect)",
            f"{_size(measured)} ({_size(predicted)})",
            f"one span, two CFG branches{extra}",
        )
    ]


def _size(count: float) -> str:
    """Bytes in KiB below a MiB, else MiB."""
    return f"{count / 2**10:.1f} KiB" if abs(count) < 2**20 else f"{count / 2**20:.1f} MiB"


class EmbeddingPipeline:
    """A WanPipeline without a text encoder that takes prompts: each prompt becomes seeded random embeddings.

    The profiler calls pipelines with `prompt=`; the random model has no text encoder, so this wrapper turns the
    text into (cond, uncond) embeddings seeded by its CRC-32 and forwards everything else.
    """

    def __init__(self, pipe: Any, text_shape: tuple[int, int]) -> None:
        self.pipe, self.text_shape = pipe, text_shape
        self.transformer, self.scheduler, self.vae = pipe.transformer, pipe.scheduler, pipe.vae

    def __call__(self, prompt: str, negative_prompt: str | None = None, **kwargs: Any) -> Any:
        generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(prompt.encode()))
        parameter = next(self.transformer.parameters())
        cond, uncond = (
            torch.randn((1, *self.text_shape), generator=generator).to(parameter.device, parameter.dtype)
            for _ in range(2)
        )
        return self.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, **kwargs)


def row_profiling(suite: Suite) -> list[Row]:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from dit_accel.profiler.recorder import RecordSettings
    from dit_accel.profiler.run import profile_prompts

    size = suite.size
    with torch.device(suite.device):
        vae = AutoencoderKLWan(base_dim=size.vae_base_dim).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=suite.transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    wrapped = EmbeddingPipeline(pipe, (size.text_tokens, size.config["text_dim"]))
    settings = RecordSettings(num_inference_steps=size.steps, guidance_scale=GUIDANCE, sensitivity_prompts=0)
    prompts = [PromptSpec(f"random prompt {i}", seed=i) for i in range(2)]
    video = {"num_frames": size.frames, "height": size.height, "width": size.width}
    with tempfile.TemporaryDirectory() as folder:
        summary = profile_prompts(wrapped, prompts, Path(folder) / "suite.h5", settings, video, progress=False)
    return [
        Row(
            "profiling",
            f"dit-profile on {summary.prompts_profiled} prompts ({size.steps} steps): seconds and MB per prompt",
            f"{summary.seconds_per_prompt:.1f} s, {summary.bytes_per_prompt / 1e6:.1f} MB",
            "the first prompt also measures FLOPs; no step-sensitivity pass",
        )
    ]


ROW_FUNCTIONS: dict[str, Callable[[Suite], list[Row]]] = {
    "overhead": row_overhead,
    "plans": row_plans,
    "peers": row_peers,
    "compile": row_compile,
    "pruned_attention": row_pruned_attention,
    "cache_memory": row_cache_memory,
    "profiling": row_profiling,
}


def run_rows(suite: Suite, names: Sequence[str], done: Callable[[list[Row]], None] = lambda rows: None) -> list[Row]:
    """Every named row, calling `done` with the rows so far after each; a row that raises becomes one line saying
    so, and the others still run."""
    rows: list[Row] = []
    for name in names:
        print(f"gpu_suite: {name} …", flush=True)
        started = time.perf_counter()
        try:
            new = ROW_FUNCTIONS[name](suite)
        except Exception as exc:  # noqa: BLE001 - a failing row must not abort the one-call run
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            new = [Row(name, "failed", f"{type(exc).__name__}: {message}"[:200])]
        elapsed = (time.perf_counter() - started) / len(new)
        rows.extend(replace(row, seconds=elapsed) for row in new)
        done(rows)
    return rows


def render(rows: Sequence[Row], suite: Suite, seconds: float) -> str:
    """The markdown page: what ran where, the table, which rows need a GPU."""
    size = suite.size
    escape = str.maketrans({"|": "\\|", "\n": " "})
    lines = [
        "# Benchmarks: the GPU suite",
        "",
        "Written by `python -m dit_accel.bench.gpu_suite"
        + (" --smoke" if size.name == "smoke" else "")
        + f"` on {datetime.date.today().isoformat()} in {seconds:.0f} s. Random weights: speed and memory only.",
        "",
        f"- model: Wan transformer `{size.name}` ({suite.blocks} blocks, width {size.hidden}, "
        f"{size.config['num_attention_heads']} heads of {size.config['attention_head_dim']}), random weights (seed 0)",
        f"- video: {size.frames} frames at {size.height}×{size.width} ({size.tokens} tokens), {size.steps} steps, CFG "
        f"{GUIDANCE:g} (cond and uncond calls)",
        f"- device: {device_name(suite.device)}, {str(suite.dtype).removeprefix('torch.')}, torch {torch.__version__}, "
        f"median of {size.repeats} interleaved repeats",
        "",
        "| row | measurement | result | note | needs a GPU | s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        needs = "yes" if row.name.split()[0] in GPU_ROWS else "no"
        cells = (row.name, row.measurement, row.result, row.note, needs, f"{row.seconds:.0f}")
        lines.append("| " + " | ".join(c.translate(escape) for c in cells) + " |")
    lines += [
        "",
        "Rows marked *needs a GPU* measure kernels and memory traffic a CPU does not have: their CPU numbers say "
        "nothing about CUDA. On the CPU, a pruned call runs the math kernel (q/k and v head dims differ), so pruning "
        "is slower than full attention there; see docs/runtime.md.",
        "",
        "On a GPU machine: `python -m dit_accel.bench.gpu_suite` (one call; `--rows a,b` re-runs a subset, "
        "`--frames 81` measures the full 480p length).",
    ]
    return "\n".join(lines) + "\n"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (seconds)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown file to write")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--frames", type=int, help="video frames (4k+1)")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 with --smoke, else torch's)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        parser.error(f"unknown row(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(ROWS)}")
    out = Path(args.out)
    if not out.parent.is_dir():
        parser.error(f"--out {out}: folder {out.parent} does not exist")
    size = SMOKE if args.smoke else FULL
    size = replace(size, frames=args.frames or size.frames, steps=args.steps or size.steps)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.smoke else threads))
    started = time.perf_counter()
    try:
        suite = Suite(size, device, dtype)
        rows = run_rows(suite, names, lambda rows: write_page(out, render(rows, suite, time.perf_counter() - started)))
    finally:
        torch.set_num_threads(threads)
    print(out.read_text())
    return rows


def write_page(out: Path, text: str) -> None:
    """Replace `out` whole (written beside it, then renamed), so a run cut short leaves the rows done so far."""
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text)
    partial.replace(out)


if __name__ == "__main__":
    main()
