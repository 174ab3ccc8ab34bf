"""Calibration data flow: which prompts run, on which pipeline, into which file, and how runs resume and merge.

`profile_prompts` is what `dit-profile` calls. It measures per-block cost once (a short pass before any probe is
installed), then generates every prompt with the `Recorder` attached, makes each finished prompt durable as its own
sealed shard beside the output and assembles the profile once at the end (`ProfileWriter`), so an interrupted run
resumes with `resume=True` and loses at most the prompt in progress. One run per output: a second is refused.
Under `torchrun`, every rank profiles its shard of prompts into its own file and rank 0 merges them.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_accel.harness.errors import DitAccelError
from dit_accel.harness.pipelines import check_pipeline_inputs, generate
from dit_accel.harness.prompts import PromptSpec
from dit_accel.runtime.adapters import (
    find_experts,
    fingerprint_pipeline,
    get_adapter,
    noisy_latent_channels,
)
from dit_accel.runtime.plan import ModelFingerprint

from .flops import count_flops
from .foreground import foreground_mask, latent_to_token_features
from .recorder import Recorder, RecordSettings
from .schema import (
    ProfileError,
    ProfileHeader,
    ProfileLock,
    ProfileWriter,
    PromptInfo,
    iter_prompt_groups,
    open_profile,
    parts_folder,
    prompt_key,
    written_prompts,
)
from .sensitivity import measure_sensitivity, sensitivity_steps

MAX_STORED_VIDEO_BYTES = 4 << 20
COST_STEPS = 3


@dataclass(frozen=True)
class Cost:
    """Per-call cost of the transformer and of each block, and the token grid seen during the cost pass."""

    block_flops: np.ndarray
    block_seconds: np.ndarray
    model_flops: int
    model_seconds: float
    grid: tuple[int, int, int]


def measure_cost(pipe: Any, spec: PromptSpec, guidance: float, size: dict[str, int]) -> Cost:
    """FLOPs (torch's counter, CPU attention included) and median wall time per transformer call and per block.

    The experts of a multi-expert pipeline share one architecture: calls of any expert count alike.
    """
    experts = [module for _, module in find_experts(pipe)]
    transformer = experts[0]
    adapter = get_adapter(transformer)
    blocks = adapter.iter_blocks(transformer)
    calls: list[float] = []
    grid: list[tuple[int, int, int]] = []
    block_times: list[list[float]] = [[] for _ in blocks]
    sync = torch.cuda.synchronize if next(transformer.parameters()).is_cuda else (lambda: None)

    def model_pre(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        grid.append(adapter.token_grid(module.config, hidden, kwargs))
        sync()
        calls.append(time.perf_counter())

    def model_post(*_: Any) -> None:
        sync()
        calls[-1] = time.perf_counter() - calls[-1]

    handles = [
        hook
        for expert in experts
        for hook in (
            expert.register_forward_pre_hook(model_pre, with_kwargs=True),
            expert.register_forward_hook(model_post),
        )
    ]

    def block_pre(times: list[float]) -> Any:
        def hook(*_: Any) -> None:
            sync()
            times.append(time.perf_counter())

        return hook

    def block_post(times: list[float]) -> Any:
        def hook(*_: Any) -> None:
            sync()
            times[-1] = time.perf_counter() - times[-1]

        return hook

    for expert in experts:
        for times, (_, block, _) in zip(block_times, adapter.iter_blocks(expert)):
            handles += [
                block.register_forward_pre_hook(block_pre(times)),
                block.register_forward_hook(block_post(times)),
            ]
    try:
        with torch.no_grad():
            generate(pipe, spec, COST_STEPS, guidance, size, output_type="latent")
            _, per_module = count_flops(lambda: generate(pipe, spec, COST_STEPS, guidance, size, output_type="latent"))
    finally:
        for handle in handles:
            handle.remove()
    timed_calls = len(calls) // 2  # the first pass is timed; the second ran under the FLOP counter
    roots = sorted({type(expert).__name__ for expert in experts})
    block_flops = np.array(
        [sum(per_module.get(f"{root}.{block_id}", 0) for root in roots) // timed_calls for block_id, _, _ in blocks],
        np.int64,
    )
    seconds = np.array([statistics.median(t[1:timed_calls] or t[:1]) for t in block_times], np.float64)
    return Cost(
        block_flops,
        seconds,
        sum(per_module.get(root, 0) for root in roots) // timed_calls,
        statistics.median(calls[1:timed_calls] or calls[:1]),
        grid[0],
    )


@dataclass
class RunSummary:
    """What a profiling run did: counts, sizes and timing, for the command's report."""

    output: str
    prompts_total: int
    prompts_profiled: int
    prompts_skipped: int
    seconds: float
    seconds_per_prompt: float
    file_bytes: int
    bytes_per_prompt: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def profile_prompts(
    pipe: Any,
    prompts: list[PromptSpec],
    output: str | os.PathLike,
    settings: RecordSettings,
    size: dict[str, int] | None = None,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> RunSummary:
    """Profile this rank's share of `prompts` into `output` (see module docstring)."""
    size = size or {}
    output = Path(output)
    fingerprint = fingerprint_pipeline(pipe)
    run_settings = {
        **asdict(settings),
        **{f"size_{k}": v for k, v in sorted(size.items())},
        "pipeline": type(pipe).__name__,
    }
    check_output_location(output)
    with ProfileLock(output) as lock:
        done = _check_existing(output, fingerprint, run_settings, resume)
        mine = [(index, spec) for index, spec in enumerate(prompts) if index % world_size == rank]
        todo = [(index, spec) for index, spec in mine if index not in done]
        check_pipeline_inputs(pipe, [spec for _, spec in todo])  # a missing image: refused before any writing
        started = time.perf_counter()
        _record_prompts(pipe, todo, output, settings, size, run_settings, lock, progress)
    elapsed = time.perf_counter() - started
    size_bytes = output.stat().st_size if output.exists() else 0
    complete = len(done) + len(todo)
    return RunSummary(
        str(output),
        len(mine),
        len(todo),
        len(mine) - len(todo),
        elapsed,
        elapsed / max(len(todo), 1),
        size_bytes,
        size_bytes / max(complete, 1),
    )


def _record_prompts(
    pipe: Any,
    todo: list[tuple[int, PromptSpec]],
    output: Path,
    settings: RecordSettings,
    size: dict[str, int],
    run_settings: dict[str, Any],
    lock: ProfileLock,
    progress: bool,
) -> None:
    """Profile `todo` into `output`: each prompt made durable as it finishes, the file assembled at the end."""
    from tqdm.auto import tqdm

    (_, transformer), *others = find_experts(pipe)
    experts = [module for _, module in others]
    adapter = get_adapter(transformer)
    scheduler = getattr(pipe, "scheduler", None)
    writer = ProfileWriter(output, None, lock=lock) if written_prompts(output) is not None else None
    cost = measure_cost(pipe, todo[0][1], settings.guidance_scale, size) if todo and writer is None else None
    recorder = Recorder(transformer, adapter, settings, experts=experts, scheduler=scheduler)
    bar = tqdm(
        total=len(todo) * settings.num_inference_steps,
        desc=f"profiling {output.name}",
        unit="step",
        disable=not progress,
    )
    recorder.progress = bar
    try:
        for index, spec in todo:
            arrays = _profile_one(pipe, recorder, spec, settings, size, adapter)
            branches = recorder.observed_branches()  # what the pipeline ran, not what the guidance suggests
            step_experts = dict(recorder.step_experts)
            if index < settings.sensitivity_prompts and sensitivity_steps(
                settings.num_inference_steps, settings.sensitivity_steps
            ):
                recorder.remove()  # the sensitivity runs replay plans; they must not be recorded
                bar.set_postfix_str("step sensitivity")
                arrays["step_sensitivity"] = measure_sensitivity(pipe, spec, settings, size, progress)
                bar.set_postfix_str("")
                recorder = Recorder(transformer, adapter, settings, experts=experts, scheduler=scheduler)
                recorder.progress = bar
            if writer is None:
                fingerprint = with_expert_starts(fingerprint_pipeline(pipe), step_experts)
                header = _header(pipe, fingerprint, adapter, settings, run_settings, cost, branches)
                writer = ProfileWriter(output, header, lock=lock)
            writer.add_prompt(
                PromptInfo(prompt_key(index), index, spec.prompt, spec.negative_prompt, spec.seed), arrays
            )
        if writer is not None:
            writer.finish()
    finally:
        bar.close()
        recorder.remove()


def _profile_one(
    pipe: Any, recorder: Recorder, spec: PromptSpec, settings: RecordSettings, size: dict[str, int], adapter: Any
) -> dict[str, np.ndarray]:
    recorder.begin_prompt(spec.seed)
    with torch.no_grad():
        video = generate(pipe, spec, settings.num_inference_steps, settings.guidance_scale, size)
    arrays = recorder.collect(recorder.observed_branches())
    if recorder.final_latent is not None:
        transformer = recorder.transformer
        patch = _patch(transformer.config, adapter)
        features = latent_to_token_features(
            recorder.final_latent, adapter.grid.layout, patch, recorder.grid, noisy_latent_channels(transformer.config)
        )
        arrays["foreground"] = foreground_mask(features, seed=spec.seed)
    frames = np.asarray(video[0]) if isinstance(video, np.ndarray) else None
    if frames is not None and frames.size <= MAX_STORED_VIDEO_BYTES:
        arrays["video"] = np.clip(np.round(frames * 255), 0, 255).astype(np.uint8)
    return arrays


def _patch(config: Any, adapter: Any) -> tuple[int, int, int]:
    from dit_accel.runtime.adapters import _patch_sizes

    spatial, temporal = _patch_sizes(adapter.grid, config)
    return (1, 1, 1) if adapter.grid.layout == "tokens" else (temporal, spatial, spatial)


def with_expert_starts(fingerprint: ModelFingerprint, step_experts: dict[int, int]) -> ModelFingerprint:
    """`fingerprint` with the first step each further expert served (`step_experts`: step → expert index).

    Experts must take turns in their order, each serving one run of steps (Wan 2.2: `transformer` the high-noise
    steps, then `transformer_2`); anything else is refused in one line, since plans assume it.
    """
    steps = sorted(step_experts)
    order = [step_experts[step] for step in steps]
    if order != sorted(order):
        served = ", ".join(fingerprint.expert_names[i] for i in dict.fromkeys(order))
        raise DitAccelError(
            f"the pipeline's experts did not serve one run of steps each, in order (served: {served}); plans cannot "
            "schedule such a pipeline"
        )
    starts = {index: steps[order.index(index)] for index in set(order)}
    experts = tuple(replace(e, first_step=starts.get(i + 1)) for i, e in enumerate(fingerprint.experts))
    return replace(fingerprint, experts=experts)


def _header(
    pipe: Any,
    fingerprint: ModelFingerprint,
    adapter: Any,
    settings: RecordSettings,
    run_settings: dict,
    cost: Cost,
    branches: tuple[str, ...],
) -> ProfileHeader:
    steps = settings.num_inference_steps
    timesteps = np.asarray(pipe.scheduler.timesteps, dtype=np.float64)[:steps]
    sigmas = getattr(pipe.scheduler, "sigmas", None)
    if sigmas is None or len(sigmas) < steps:
        train_steps = getattr(pipe.scheduler.config, "num_train_timesteps", 1000)
        sigmas = timesteps / float(train_steps)
    return ProfileHeader(
        fingerprint=fingerprint,
        settings=run_settings,
        branches=branches,
        grid=cost.grid,
        adapter=adapter.name,
        cfg_mode=adapter.cfg_mode,
        timesteps=timesteps,
        sigmas=np.asarray(sigmas, dtype=np.float64)[:steps],
        block_flops=cost.block_flops,
        block_seconds=cost.block_seconds,
        model_flops=int(cost.model_flops),
        model_seconds=float(cost.model_seconds),
    )


def check_output_location(output: str | os.PathLike) -> None:
    """Refuse early (before loading a model) an output whose folder is missing or not writable, or that another
    run is writing (its lock is held)."""
    folder = Path(output).parent
    if not folder.is_dir():
        raise DitAccelError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise DitAccelError(f"output folder {folder} is not writable")
    with ProfileLock(output):
        pass


def _check_existing(output: Path, fingerprint: Any, run_settings: dict, resume: bool) -> set[int]:
    """Indices already complete in `output` and its unfinished shards; refuses a file of another model or settings."""
    try:
        state = written_prompts(output)
    except ProfileError as exc:
        raise DitAccelError(
            f"{output} exists and is not a readable profile ({exc}); choose another output path"
        ) from None
    if state is None:
        return set()
    header, prompts = state
    if header.fingerprint != fingerprint:
        raise DitAccelError(
            f"{output} exists and holds a profile of another model "
            f"({header.fingerprint.transformer_class}); choose another output path"
        )
    if not resume:
        raise DitAccelError(_not_resumed(output, len(prompts)))
    if header.settings != run_settings:
        differ = sorted(
            k for k in set(run_settings) | set(header.settings) if run_settings.get(k) != header.settings.get(k)
        )
        raise DitAccelError(
            f"{output} was recorded with different settings ({', '.join(differ)}); resume with the same options"
        )
    return {p.index for p in prompts}


def _not_resumed(output: Path, prompts: int) -> str:
    if output.exists():
        return f"{output} already exists; pass --resume to complete it or choose another output path"
    return (
        f"an interrupted run left {prompts} finished prompt(s) of {output} in {parts_folder(output)}; pass --resume "
        "to complete it, or remove that folder to start over"
    )


def merge_profiles(inputs: list[str | os.PathLike], output: str | os.PathLike) -> int:
    """Merge profiles of one model and one set of settings into `output`; returns the number of prompts."""
    output = Path(output)
    if output.exists():
        raise DitAccelError(f"{output} already exists; choose another output path for the merge")
    if not inputs:
        raise DitAccelError("no profiles to merge")
    profiles = [open_profile(p) for p in inputs]
    first = profiles[0].header
    for profile in profiles[1:]:
        reason = first.compatible_with(profile.header)
        if reason:
            raise DitAccelError(f"cannot merge {profile.path}: {reason}")
    entries, seen = [], set()
    for profile in profiles:
        for info, arrays in iter_prompt_groups(profile.path):
            if info.index in seen:
                raise DitAccelError(
                    f"prompt index {info.index} appears in more than one profile ({profile.path}); were the shards "
                    "made from one prompts file?"
                )
            seen.add(info.index)
            entries.append((info, arrays))
    entries.sort(key=lambda e: e[0].index)
    ProfileWriter(output, first).add_prompts(entries)
    return len(entries)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_path(output: str | os.PathLike, rank: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}.rank{rank}{output.suffix}")


def profile_distributed(
    pipe: Any, prompts: list[PromptSpec], output: str | os.PathLike, settings: RecordSettings, **kwargs: Any
) -> RunSummary:
    """Each rank profiles its shard into `<output>.rank<r>.h5`; after a barrier, rank 0 merges them into `output`."""
    rank, world = distributed_rank()
    if world == 1:
        return profile_prompts(pipe, prompts, output, settings, **kwargs)
    summary = profile_prompts(pipe, prompts, shard_path(output, rank), settings, rank=rank, world_size=world, **kwargs)
    torch.distributed.barrier()
    if rank == 0:
        shards = [shard_path(output, r) for r in range(world)]
        merge_profiles([s for s in shards if s.exists()], output)
        for shard in shards:
            shard.unlink(missing_ok=True)
    torch.distributed.barrier()
    return summary
