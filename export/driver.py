"""Replay an exported plan (`dit-plan export-onnx`) with onnxruntime: numpy in, numpy out, no PyTorch needed.

The export folder holds one ONNX graph per distinct action set and `manifest.json`, which maps every denoising
step to its graph and DWS weights. `OnnxPlanRunner.step` runs one transformer call: it feeds the graph the model
inputs plus the residual caches and blend weights the graph asks for, and keeps the `cache_out.*` tensors it
returns, per CFG branch, for the steps that reuse them. For plans whose policy says `reuse: extrapolate`, what it
feeds back is the returned residual moved one step along its slope since the span's previous computed step, exactly
as the torch runtime caches it (`slope`: the manifest's `advance` steps); for `reuse: scale`, the hidden-state
residual times the manifest's `gain` for the step. `denoise` is the flow-matching Euler loop with separate
cond/uncond calls that Wan-style text-to-video pipelines (and the default model) run.

This module imports only numpy, the standard library, `export.manifest` and (lazily) onnxruntime: no torch.

Example:
    >>> runner = OnnxPlanRunner("export/")
    >>> latents = denoise(runner, noise, cond_embeds, uncond_embeds, guidance_scale=5.0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .manifest import BLEND, CACHE_IN, CACHE_OUT, ExportError, read_manifest


class OnnxPlanRunner:
    """Runs one transformer call per (branch, step) on the exported graphs, keeping each branch's residual caches."""

    def __init__(self, folder: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.providers = list(providers)
        self._sessions: dict[int, Any] = {}
        self.caches: dict[str, dict[str, np.ndarray]] = {}
        self.computed: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
        self.slopes: dict[str, dict[str, np.ndarray]] = {}
        self.reuse_mode = self.manifest.get("reuse", "hold")

    @property
    def num_steps(self) -> int:
        return len(self.manifest["steps"])

    def session(self, index: int) -> Any:
        """The onnxruntime session of graph `index`, created on first use."""
        if index not in self._sessions:
            import onnxruntime

            path = self.folder / self.manifest["graphs"][index]["file"]
            if not path.is_file():
                raise ExportError(f"{path} is missing from the export; re-export the plan")
            self._sessions[index] = onnxruntime.InferenceSession(str(path), providers=self.providers)
        return self._sessions[index]

    def reset(self) -> None:
        """Forget every branch's caches (a new generation)."""
        self.caches.clear()
        self.computed.clear()
        self.slopes.clear()

    def step(self, branch: str, step: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The transformer's output at `step` for CFG `branch` (e.g. "cond"), given its model inputs by name."""
        if not 0 <= step < self.num_steps:
            raise ExportError(f"step {step} is outside the export's {self.num_steps} steps")
        entry = self.manifest["steps"][step]
        graph = self.manifest["graphs"][entry["graph"]]
        caches = self.caches.setdefault(branch, {})
        computed = self.computed.setdefault(branch, {})
        slopes = self.slopes.setdefault(branch, {})
        if step == 0:
            caches.clear()
            computed.clear()
            slopes.clear()
        feeds = {}
        for name in graph["inputs"]:
            if name.startswith(CACHE_IN):
                key = name[len(CACHE_IN) :]
                if key not in caches:
                    raise ExportError(
                        f"step {step} of branch '{branch}' reuses cache {key}, which no earlier step computed; run "
                        "steps in order from 0"
                    )
                moved = self._advanced(caches[key], slopes.get(key), self._advance(entry, key))
                feeds[name] = self._scaled(moved, entry, key)
            elif name.startswith(BLEND):
                feeds[name] = np.array([entry["blend"][name]], dtype=np.float32)
            elif name in inputs:
                feeds[name] = inputs[name]
            else:
                raise ExportError(f"graph {graph['file']} needs input '{name}'; pass it in `inputs`")
        outputs = self.session(entry["graph"]).run(graph["outputs"], feeds)
        for name, value in zip(graph["outputs"][1:], outputs[1:]):
            key = name[len(CACHE_OUT) :]
            caches[key] = value
            self._store_slope(computed, slopes, key, value, step)
        return outputs[0]

    def _store_slope(
        self,
        computed: dict[str, tuple[np.ndarray, int]],
        slopes: dict[str, np.ndarray],
        key: str,
        residual: np.ndarray,
        step: int,
    ) -> None:
        """In slope modes, the residual's slope per step since the previous computed one (as the torch runtime)."""
        if self.reuse_mode not in ("extrapolate", "slope"):
            return
        previous = computed.get(key)
        computed[key] = (residual, step)
        if previous is None:
            slopes.pop(key, None)
            return
        before, before_step = previous
        slopes[key] = (residual - before) * np.float32(1.0 / (step - before_step))

    def _advance(self, entry: dict[str, Any], key: str) -> float:
        """Steps along the slope the cache `key` (`<span>.hidden`) moves at this step (manifest `advance` per span)."""
        advance = entry.get("advance")
        if advance is None:
            return 1.0 if self.reuse_mode == "extrapolate" else 0.0
        return float(advance.get(key.split(".")[0], 0.0))

    @staticmethod
    def _scaled(residual: np.ndarray, entry: dict[str, Any], key: str) -> np.ndarray:
        """The cache `key` times the scaled hold's gain at this step (hidden states only; manifest `gain` per span)."""
        span, stream = key.split(".")[0], key.split(".")[-1]
        gain = float(entry.get("gain", {}).get(span, 1.0))
        return residual if gain == 1.0 or stream != "hidden" else residual * np.float32(gain)

    @staticmethod
    def _advanced(residual: np.ndarray, slope: np.ndarray | None, advance: float) -> np.ndarray:
        if slope is None or advance == 0.0:
            return residual
        return residual + slope if advance == 1.0 else residual + slope * np.float32(advance)


def denoise(
    runner: OnnxPlanRunner,
    latents: np.ndarray,
    cond: np.ndarray,
    uncond: np.ndarray | None,
    guidance_scale: float = 5.0,
    condition: np.ndarray | None = None,
) -> np.ndarray:
    """Flow-matching Euler sampling with classifier-free guidance as separate cond/uncond calls (Wan's loop).

    `latents` is the initial noise, `cond` / `uncond` the prompt embeddings; timesteps and sigmas come from the
    manifest (the scheduler the plan was exported with). `condition`, when given, is appended to the latents along
    the channel axis for every call, as Wan's image-to-video pipeline appends its mask and image latents. Returns
    the final latents in float32.
    """
    schedule = runner.manifest.get("scheduler") or {}
    timesteps, sigmas = schedule.get("timesteps"), schedule.get("sigmas")
    if not timesteps or not sigmas or len(sigmas) < len(timesteps) + 1:
        raise ExportError(
            "the manifest has no flow-matching timesteps and sigmas; this export cannot be denoised by `denoise`"
        )
    runner.reset()
    latents = latents.astype(np.float32)
    use_cfg = guidance_scale > 1.0 and uncond is not None
    condition = None if condition is None else condition.astype(np.float32)
    for i, t in enumerate(timesteps):
        timestep = np.full((latents.shape[0],), t, dtype=np.float32)
        model_input = latents if condition is None else np.concatenate([latents, condition], axis=1)
        prediction = runner.step(
            "cond", i, {"hidden_states": model_input, "timestep": timestep, "encoder_hidden_states": cond}
        )
        if use_cfg:
            unconditional = runner.step(
                "uncond", i, {"hidden_states": model_input, "timestep": timestep, "encoder_hidden_states": uncond}
            )
            prediction = unconditional + guidance_scale * (prediction - unconditional)
        latents = latents + np.float32(sigmas[i + 1] - sigmas[i]) * prediction.astype(np.float32)
    return latents
