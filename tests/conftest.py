"""Shared fixtures: tiny real diffusers pipelines with random weights, built without any download."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker (and the subprocesses its tests start) its share of the cores.

    Without it every worker's torch uses all cores and they oversubscribe the machine, which makes the suite slower
    in parallel than in series.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


_share_cores_between_workers()

from tiny_models import cogvideox_vae, ltx_vae, tiny_cogvideox, tiny_ltx, tiny_wan, wan_vae  # noqa: E402


def tiny_wan_pipeline(num_layers: int = 3):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    vae = wan_vae()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=tiny_wan(num_layers).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogvideox_pipeline():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(0)
    vae = cogvideox_vae()
    pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=tiny_cogvideox().eval(),
        scheduler=CogVideoXDDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ltx_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    torch.manual_seed(0)
    vae = ltx_vae()
    pipe = LTXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=tiny_ltx().eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 8, dim, generator=g), torch.randn(1, 8, dim, generator=g)


def run_pipeline(pipe, steps: int = 4, seed: int = 0):
    """One generation of a tiny pipeline with fixed random prompt embeddings; returns a numpy video."""
    cond, uncond = _embeds(seed)
    kwargs = dict(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    name = type(pipe).__name__
    if name == "WanPipeline":
        kwargs.update(height=16, width=16, num_frames=5)
    elif name == "CogVideoXPipeline":
        kwargs.update(height=16, width=16, num_frames=9)
    else:
        mask = torch.ones(1, 8, dtype=torch.long)
        kwargs.update(
            height=32, width=32, num_frames=9, prompt_attention_mask=mask, negative_prompt_attention_mask=mask
        )
    return pipe(**kwargs).frames


PIPELINES = {"wan": tiny_wan_pipeline, "cogvideox": tiny_cogvideox_pipeline, "ltx_video": tiny_ltx_pipeline}


@pytest.fixture(params=sorted(PIPELINES))
def tiny_pipeline(request):
    return PIPELINES[request.param]()
