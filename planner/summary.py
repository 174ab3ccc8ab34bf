"""`dit-plan inspect`: a plan as a JSON-ready report and as text (schedule grid, labels, spans, prediction, cache
memory).

Predicted cache memory: the runtime keeps one hidden-state residual (tokens × hidden) per cached span and CFG branch,
two where the plan extrapolates (the residual and its slope), and none for a span that never stores. Tokens come
from the plan's provenance (`grid`, the profile's token grid, or `tokens`) or the caller; hidden from the provenance
(`hidden`), the caller, or the PCA bases (heads × head dim, the hidden size of every supported DiT); branches from
the profiled guidance scale (two above 1). What is missing is reported as unknown, never guessed. Joint-attention
models (HunyuanVideo, Mochi, CogVideoX) also cache the text tokens' residual, not counted here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dit_accel.harness.cli import printable
from dit_accel.runtime.errors import PlanError
from dit_accel.runtime.plan import COMPUTE, PRUNE, REUSE, Plan, cache_level
from dit_accel.runtime.replay_table import CompiledSchedule

from .shapes import blending_blocks

ACTION_CHARS = {COMPUTE: "C", REUSE: ".", PRUNE: "P"}
LABEL_CHARS = {"foreground": "F", "background": "B", "unlabelled": "-"}


def schedule_string(row: np.ndarray) -> str:
    """One block's actions as characters: C compute, . reuse, P prune."""
    return "".join(ACTION_CHARS[int(a)] for a in row)


def expected_string(row: np.ndarray) -> str:
    """Share of profiled replays computing a block at each step: # ≥ 3/4, + ≥ 1/2, - ≥ 1/4, . below."""
    return "".join("#" if f >= 0.75 else "+" if f >= 0.5 else "-" if f >= 0.25 else "." for f in row)


def plan_report(
    plan: Plan, tokens: int | None = None, hidden: int | None = None, dtype_bytes: int = 2
) -> dict[str, Any]:
    """Everything `inspect` shows, as plain JSON values; `tokens`/`hidden` override what the plan records, and
    `dtype_bytes` is the runtime dtype's size (2: bfloat16/float16) for the predicted cache memory."""
    blocks = []
    for index, block_id in enumerate(plan.model.block_ids):
        row = plan.actions[index]
        entry = {
            "id": block_id,
            "label": plan.labels[index],
            "score": float(plan.label_scores[index]),
            "schedule": schedule_string(row),
            "computed": int(np.sum(row == COMPUTE)),
            "reused": int(np.sum(row == REUSE)),
            "pruned": int(np.sum(row == PRUNE)),
        }
        if f"pca.{index}" in plan.arrays:
            entry["pca_rank"] = int(plan.arrays[f"pca.{index}"].shape[-1])
        if f"pca_explained.{index}" in plan.arrays:
            entry["pca_explained"] = [float(v) for v in plan.arrays[f"pca_explained.{index}"]]
        if "expected_compute" in plan.arrays:
            entry["expected_compute"] = expected_string(plan.arrays["expected_compute"][index])
        blocks.append(entry)
    return {
        "model": {
            "transformer_class": plan.model.transformer_class,
            "config_hash": plan.model.config_hash,
            "blocks": plan.num_blocks,
        },
        "num_inference_steps": plan.num_inference_steps,
        "policy": plan.policy,
        "method": plan.provenance.get("method"),
        "compute_fraction": plan.compute_fraction(),
        "predicted": plan.predicted,
        "spans": [list(span) for span in plan.spans],
        "blocks": blocks,
        "provenance": plan.provenance,
        "arrays": {name: list(array.shape) for name, array in sorted(plan.arrays.items())},
        "cache_memory": cache_memory(plan, tokens, hidden, dtype_bytes),
    }


def cache_memory(plan: Plan, tokens: int | None, hidden: int | None, dtype_bytes: int) -> dict[str, Any]:
    """Predicted bytes of cached residuals: per span (per branch) and in total (see the module docstring)."""
    tokens = tokens or _provenance_tokens(plan.provenance)
    hidden = hidden or _positive_int(plan.provenance.get("hidden")) or _basis_hidden(plan)
    guidance = (plan.provenance.get("profile_settings") or {}).get("guidance_scale")
    branches = (2 if guidance > 1 else 1) if isinstance(guidance, (int, float)) else None
    try:
        residuals = _cached_residuals(plan)
    except PlanError as exc:
        return {"unknown": f"the plan does not compile: {exc}"}
    per_tensor = tokens * hidden * dtype_bytes if tokens and hidden else None
    spans = [
        {"span": list(span), "tensors": count, "bytes_per_branch": None if per_tensor is None else count * per_tensor}
        for span, count in residuals
    ]
    report: dict[str, Any] = {
        "tokens": tokens,
        "hidden": hidden,
        "dtype_bytes": dtype_bytes,
        "branches": branches,
        "spans": spans,
        "bytes": None
        if per_tensor is None or branches is None
        else sum(c for _, c in residuals) * per_tensor * branches,
    }
    missing = [name for name, value in (("tokens", tokens), ("hidden", hidden), ("branches", branches)) if not value]
    if missing:
        report["unknown"] = f"the plan records no {', '.join(missing)} (dit-plan inspect cannot predict the bytes)"
    return report


def _cached_residuals(plan: Plan) -> list[tuple[tuple[int, int], int]]:
    """(span, residual tensors it keeps per branch) for every span that stores at the plan's own step count; an
    attention-level plan keeps one self-attention output (tokens × hidden) per block that stores one instead."""
    if cache_level(plan) == "attention":
        reads = np.any(plan.actions == REUSE, axis=1) | blending_blocks(plan.actions, plan.arrays.get("dws_weight"))
        return [((int(b), int(b) + 1), 1) for b in np.flatnonzero(reads)]
    schedule = CompiledSchedule(plan, adaptive=plan.policy.get("kind") != "static")
    table = schedule.table(plan.num_inference_steps)
    per_span = 2 if schedule.extrapolate else 1
    return [(tuple(span), per_span) for span, stores in zip(schedule.spans, table.store) if any(stores)]


def _provenance_tokens(provenance: dict[str, Any]) -> int | None:
    grid = provenance.get("grid")
    if isinstance(grid, list) and grid and all(_positive_int(v) for v in grid):
        return int(np.prod(grid))
    return _positive_int(provenance.get("tokens"))


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _basis_hidden(plan: Plan) -> int | None:
    basis = next((a for name, a in sorted(plan.arrays.items()) if name.startswith("pca.") and a.ndim == 3), None)
    return None if basis is None else int(basis.shape[0] * basis.shape[1])


def render_report(report: dict[str, Any]) -> str:
    """The text form of `plan_report`; every string from the plan is escaped (`printable`) before it is laid out."""
    report = _escaped(report)
    model, predicted, steps = report["model"], report["predicted"], report["num_inference_steps"]
    lines = [
        f"plan: {model['transformer_class']} ({model['blocks']} blocks, config {model['config_hash'][:12]}…), "
        f"{steps} steps",
        f"policy: {_policy_line(report['policy'])}; method {report['method'] or 'unknown'}",
        "predicted: " + ", ".join(f"{k} {_number(v)}" for k, v in sorted(predicted.items())),
        "",
        "schedule (C compute, . reuse, P prune; label F foreground, B background, - unlabelled):",
        *_grid(report["blocks"], steps, "schedule"),
    ]
    if any("expected_compute" in b for b in report["blocks"]):
        lines += [
            "",
            "expected compute in profiled replays (# ≥ 3/4, + ≥ 1/2, - ≥ 1/4, . less):",
            *_grid(report["blocks"], steps, "expected_compute"),
        ]
    lines += ["", "spans: " + (" ".join(f"[{a}, {b})" for a, b in report["spans"]) or "none")]
    ranks = [f"{b['id']}:{b['pca_rank']}" for b in report["blocks"] if "pca_rank" in b]
    if ranks:
        lines.append("pca ranks: " + " ".join(ranks))
    lines.append(_cache_line(report["cache_memory"]))
    lines += ["", *_provenance_lines(report["provenance"])]
    return "\n".join(lines)


def _cache_line(cache: dict[str, Any]) -> str:
    """One line of predicted cache memory: spans × tensors × tokens × hidden × bytes × branches, or what is unknown."""
    spans = cache.get("spans")
    if spans is None:
        return f"cache memory: unknown ({cache['unknown']})"
    tensors = sum(s["tensors"] for s in spans)
    if cache["bytes"] is None:
        return (
            f"cache memory: {len(spans)} cached spans, {tensors} residual tensors per branch; bytes unknown "
            f"({cache['unknown']})"
        )
    return (
        f"cache memory (predicted): {tensors} residual tensors × {cache['tokens']} tokens × {cache['hidden']} hidden × "
        f"{cache['dtype_bytes']} B × {cache['branches']} branches = {_bytes_text(cache['bytes'])}"
    )


def _bytes_text(count: int) -> str:
    """A byte count in the largest binary unit that keeps it at or above 1 (B, KiB, MiB, GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _escaped(value: Any) -> Any:
    """A JSON value with every string in it (keys included) passed through `printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def _grid(blocks: list[dict[str, Any]], steps: int, key: str) -> list[str]:
    width = max(len(b["id"]) for b in blocks) + 8
    tens = "".join(str(s // 10 % 10) if s % 10 == 0 else " " for s in range(steps))
    units = "".join(str(s % 10) for s in range(steps))
    rows = [f"{b['id']:<{width - 8}} {LABEL_CHARS[b['label']]} {b['score']:.2f}  {b[key]}" for b in blocks]
    return [" " * width + tens, " " * width + units, *rows]


def _policy_line(policy: dict[str, Any]) -> str:
    details = ", ".join(f"{k}={_number(v)}" for k, v in sorted(policy.items()) if k != "kind")
    return policy["kind"] + (f" ({details})" if details else "")


def _provenance_lines(provenance: dict[str, Any]) -> list[str]:
    lines = [f"planner {provenance.get('planner_version', '?')}"]
    for source in provenance.get("profiles", []):
        lines.append(f"profile {source['path']} (sha256 {source['sha256'][:12]}…, {source['prompts']} prompts)")
    parameters = provenance.get("parameters", {})
    if parameters:
        lines.append("parameters: " + " ".join(f"{k}={_number(v)}" for k, v in sorted(parameters.items())))
    if "tightened" in provenance:
        lines.append(f"tightened: {provenance['tightened']}")
    return lines


def _number(value: Any) -> str:
    """Compact text of a JSON value: floats to 4 significant digits, also inside lists and objects."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_number(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_number(v)}" for k, v in sorted(value.items())) + "}"
    return str(value)


def provenance_drift(plan: Plan) -> tuple[np.ndarray | None, str | None]:
    """The mean residual drift [blocks, steps] of the plan's first profile, or (None, why it is unavailable)."""
    from dit_accel.harness.errors import DitAccelError

    from .profiles import mean_residual_drift

    sources = plan.provenance.get("profiles") or []
    if not sources:
        return None, "drift heatmap skipped: the plan names no profile"
    path = sources[0].get("path", "")
    if not os.path.isfile(path):
        return None, f"drift heatmap skipped: profile {path} is missing or not a regular file"
    try:
        drift = mean_residual_drift(path)
    except (DitAccelError, OSError, KeyError) as exc:
        return None, f"drift heatmap skipped: {str(exc).splitlines()[0]}"
    if drift.shape != plan.actions.shape:
        return (
            None,
            f"drift heatmap skipped: profile {path} has {drift.shape[0]} blocks × {drift.shape[1]} steps, the plan "
            f"{plan.actions.shape}",
        )
    return drift, None
