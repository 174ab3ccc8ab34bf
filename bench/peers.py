"""diffusers' own caches as the bench's peers: their settings as plain data, and how each is switched on.

Every peer is swept along one knob of its own config (called its threshold in the report) so that it traces a
speed/fidelity curve. A peer's settings are a JSON-able dict (`{"peer": "magcache", "threshold": 0.12, …}`), saved
as they are in the report; the one callable some configs need, the current timestep, is built only when the config
is applied (`peer_enabled`).

How each peer is configured:

* `fbc` — `FirstBlockCacheConfig(threshold)`: skip the rest of the stack while the first block's residual changes
  less than the threshold (relative mean absolute difference).
* `taylorseer` — `TaylorSeerCacheConfig(cache_interval=N, disable_cache_before_step=3, max_order=1)`. Its default
  identifiers (`^blocks.*attn`, matched with `re.fullmatch`) hook nothing on Wan, whose attention modules are `attn1`
  and `attn2`; the bench passes `cache_identifiers` built from the model adapter: every block's attention modules
  and feed-forward, the features the original TaylorSeer forecasts. Taylor factors are kept in the model's dtype
  (diffusers' default is bfloat16).
* `magcache` — `MagCacheConfig(threshold, max_skip_steps=3, retention_ratio=0.2, mag_ratios)`. The ratios come from
  diffusers' own calibration mode (`calibrate=True`, which prints one list per CFG branch and generation) on the
  calibration prompts; the bench averages the printed lists, since diffusers applies one list to both branches.
* `seacache` — `SeaCacheConfig(threshold)`. Its spectral indicator reads the transformer's noisy latent input;
  diffusers finds it by itself only for Wan T2V (input channels = output channels) and otherwise fails open,
  skipping nothing. A Wan transformer with conditioning channels appended to its input (Wan I2V; the default
  model's position channels) gets `noisy_channels` in its settings, and the callback handed to SeaCache passes
  it the first that many input channels, the noisy latent in Wan's layout.
* `pab` — `PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=N, timestep range (100, 800))`; the
  current timestep is read from the transformer's `timestep` argument by a read-only pre-hook. PAB keeps one cache
  per attention module, shared by both CFG branches: on a pipeline with separate cond/uncond calls, a skipped call
  reuses the attention output of the other branch's last computed call.
* `fastercache` — `FasterCacheConfig(spatial_attention_block_skip_range=N)`, only where the pipeline batches CFG
  (its CFG-cache splits one batched call into its uncond and cond halves).
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dit_accel.harness.pipelines import DTYPES
from dit_accel.harness.prompts import PromptSpec
from dit_accel.runtime.adapters import ModelAdapter, get_adapter, noisy_latent_channels

from .errors import BenchError

TIMESTEP_PEERS = ("pab", "fastercache")


@dataclass(frozen=True)
class PeerSpec:
    """One diffusers cache: its config class, the knob the bench sweeps, the default and quick grids."""

    name: str
    config_class: str
    knob: str
    grid: tuple[float, ...]
    quick: float
    integer: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()
    #: Second knobs the full sweep crosses with `grid` (each entry overrides `fixed`); --quick uses `fixed` alone.
    sweep: tuple[tuple[tuple[str, Any], ...], ...] = ((),)

    def check_value(self, value: float) -> float | int:
        """A grid value as the config wants it; refuses what the config would not accept."""
        if self.integer:
            if value != int(value) or value < 1:
                raise BenchError(f"{self.name} sweeps {self.knob}, which takes integers >= 1, got {value:g}")
            return int(value)
        if not value >= 0:
            raise BenchError(f"{self.name} sweeps {self.knob}, which takes numbers >= 0, got {value:g}")
        return float(value)


PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in (
        PeerSpec("fbc", "FirstBlockCacheConfig", "threshold", (0.1, 0.15, 0.25, 0.4), 0.15),
        PeerSpec(
            "taylorseer",
            "TaylorSeerCacheConfig",
            "cache_interval",
            (2, 3, 4, 5, 6),
            3,
            integer=True,
            fixed=(("disable_cache_before_step", 3), ("max_order", 1)),
            sweep=((), (("disable_cache_before_step", 1),)),
        ),
        PeerSpec(
            "magcache",
            "MagCacheConfig",
            "threshold",
            (0.02, 0.06, 0.12, 0.24, 0.5),
            0.12,
            fixed=(("max_skip_steps", 3), ("retention_ratio", 0.2)),
            sweep=((), (("max_skip_steps", 6), ("retention_ratio", 0.1))),
        ),
        PeerSpec("seacache", "SeaCacheConfig", "threshold", (0.03, 0.1, 0.25, 0.5, 1.0), 0.25),
        PeerSpec(
            "pab",
            "PyramidAttentionBroadcastConfig",
            "spatial_attention_block_skip_range",
            (2, 3, 4),
            2,
            integer=True,
            fixed=(("spatial_attention_timestep_skip_range", [100, 800]),),
        ),
        PeerSpec("fastercache", "FasterCacheConfig", "spatial_attention_block_skip_range", (2, 3), 2, integer=True),
    )
}


def not_applicable(name: str, adapter: ModelAdapter, guidance: float) -> str | None:
    """Why a peer cannot run on this pipeline (reported as not applicable, not as a failure), or None."""
    if name != "fastercache":
        return None
    if adapter.cfg_mode != "batched":
        return (
            "the pipeline runs CFG as separate cond/uncond calls; FasterCache's CFG-cache needs them batched into "
            "one call"
        )
    if guidance <= 1.0:
        return "no classifier-free guidance at this guidance scale, so FasterCache's CFG-cache has nothing to cache"
    if adapter.grid.layout == "tokens":
        return "FasterCache splits 5-D latents into frames; this transformer takes packed tokens"
    return None


def peer_settings(
    name: str,
    value: float,
    transformer: torch.nn.Module,
    steps: int,
    mag_ratios: Sequence[float] | None = None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> dict[str, Any]:
    """The plain-data settings of one peer run: its knob, its fixed fields (with a sweep entry's `overrides`) and
    what this model needs."""
    spec = PEERS[name]
    settings: dict[str, Any] = {"peer": name, spec.knob: spec.check_value(value), **dict(spec.fixed), **dict(overrides)}
    if name == "taylorseer":
        settings["cache_identifiers"] = taylorseer_identifiers(transformer)
        settings["taylor_factors_dtype"] = str(next(transformer.parameters()).dtype).removeprefix("torch.")
    elif name == "magcache":
        if mag_ratios is None:
            raise BenchError("magcache needs calibrated mag_ratios")
        settings.update(num_inference_steps=steps, mag_ratios=[float(r) for r in mag_ratios])
    elif name == "fastercache":
        settings["tensor_format"] = get_adapter(transformer).grid.layout
    elif name == "seacache":
        from diffusers import WanTransformer3DModel

        channels = noisy_latent_channels(transformer.config)
        if channels is not None and isinstance(
            transformer, WanTransformer3DModel
        ):  # the class diffusers' own gate checks
            settings["noisy_channels"] = int(channels)
    return settings


def taylorseer_identifiers(transformer: torch.nn.Module) -> list[str]:
    """`re.fullmatch` patterns for every block's attention modules and feed-forward, from the model adapter."""
    from diffusers.models.attention import FeedForward

    adapter = get_adapter(transformer)
    patterns = []
    for spec in adapter.block_lists:
        first = getattr(transformer, spec.attr)[0]
        names = [a.attr for a in adapter.attention if hasattr(first, a.attr)]
        names += [n for n, child in first.named_children() if isinstance(child, FeedForward)]
        patterns.append(rf"{spec.attr}\.\d+\.({'|'.join(names)})")
    return patterns


def make_config(settings: dict[str, Any], current_timestep: Callable[[], float]) -> Any:
    """The diffusers config object for plain-data `settings` (range lists become tuples, dtype names dtypes)."""
    from diffusers import hooks

    spec = PEERS[settings["peer"]]
    params = {
        k: tuple(v) if k.endswith("_range") and isinstance(v, list) else v for k, v in settings.items() if k != "peer"
    }
    if "taylor_factors_dtype" in params:
        params["taylor_factors_dtype"] = DTYPES[params["taylor_factors_dtype"]]
    if spec.name in TIMESTEP_PEERS:
        params["current_timestep_callback"] = current_timestep
    if "noisy_channels" in params:
        params["raw_vision_callback"] = noisy_latent_reader(params.pop("noisy_channels"))
    return getattr(hooks, spec.config_class)(**params)


def noisy_latent_reader(channels: int) -> Callable[[torch.nn.Module, tuple, dict], list[torch.Tensor] | None]:
    """SeaCache's `raw_vision_callback` for a Wan transformer with conditioning channels after the noisy latent.

    Returns, per batch item, the first `channels` channels of the 5-D `hidden_states` argument (None when the call
    has none), which is what diffusers reads on Wan T2V where there is nothing to drop.
    """

    def read(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 5:
            return None
        return list(hidden[:, :channels].unbind(0))

    return read


class TimestepProbe:
    """Remembers the `timestep` argument of the latest transformer call; calling it returns that value."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.value = 1000.0
        self.handle = transformer.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None:
            self.value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)

    def __call__(self) -> float:
        return self.value

    def remove(self) -> None:
        self.handle.remove()


def count_hooks(transformer: torch.nn.Module) -> int:
    """diffusers hooks installed anywhere in the transformer (to prove a cache hooked something)."""
    return sum(len(m._diffusers_hook.hooks) for m in transformer.modules() if hasattr(m, "_diffusers_hook"))


@contextlib.contextmanager
def peer_enabled(transformer: torch.nn.Module, settings: dict[str, Any]) -> Iterator[int]:
    """Enable a peer with `transformer.enable_cache`, yield how many hooks it installed, then disable it.

    A config whose module identifiers match nothing installs no hook; that is refused rather than measured as a
    method that happens to skip nothing.
    """
    probe = TimestepProbe(transformer)
    before = count_hooks(transformer)
    try:
        transformer.enable_cache(make_config(settings, probe))
        hooked = count_hooks(transformer) - before
        if hooked == 0:
            raise BenchError(
                f"{settings['peer']} installed no hook on {type(transformer).__name__} (its module identifiers match "
                "nothing)"
            )
        yield hooked
    finally:
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        probe.remove()


def calibrate_mag_ratios(
    transformer: torch.nn.Module, generate: Callable[[PromptSpec], Any], prompts: Sequence[PromptSpec], steps: int
) -> dict[str, Any]:
    """MagCache ratios from diffusers' calibration mode on `prompts`: the mean of the lists it prints.

    Returns the averaged `mag_ratios` and every printed list (one per CFG branch per generation).
    """
    from diffusers import MagCacheConfig

    printed = io.StringIO()
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(printed):
            for spec in prompts:
                generate(spec)
    finally:
        transformer.disable_cache()
    runs = _printed_ratio_lists(printed.getvalue(), steps)
    if not runs:
        raise BenchError("MagCache calibration printed no ratio list; this diffusers version calibrates differently")
    return {
        "mag_ratios": np.mean(runs, axis=0).tolist(),
        "runs": runs,
        "source": "diffusers MagCacheConfig(calibrate=True)",
        "prompts": [spec.prompt for spec in prompts],
    }


def _printed_ratio_lists(text: str, steps: int) -> list[list[float]]:
    """The `[r0, r1, …]` lists of `steps` numbers in MagCache's calibration printout."""
    runs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            values = ast.literal_eval(line)
            if len(values) == steps:
                runs.append([float(v) for v in values])
    return runs
