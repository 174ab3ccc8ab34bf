"""The bench's outputs: the report with definitions and where our plans stand, a markdown table, JSON, a Pareto plot.

Every output is rendered in memory first and written at the end, each through a temporary file renamed into place
only once all of them are ready, so a failed run leaves no partial output behind.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dit_accel.harness.files import write_files_atomic

OURS = "auto"
DEFINITIONS = {
    "psnr": (
        "10·log10(1 / MSE) in dB, the MSE taken over the whole video at once (every frame, pixel and RGB channel in "
        "[0, 1]) against the un-accelerated video of the same prompt and seed; the table shows the PSNR of the MSE "
        "averaged over prompts (so a prompt left unchanged does not make the row ∞)"
    ),
    "ssim": "Gaussian-window SSIM (11 px, sigma 1.5) per frame and channel, averaged; mean over prompts",
    "lpips": "mean over frames of the user-supplied TorchScript LPIPS model, images scaled to [-1, 1]",
    "wall_speedup": (
        "median over interleaved rounds of (un-accelerated time / the variant's time), both summed over prompts, the "
        "un-accelerated time of each variant run being the mean of the two un-accelerated runs that bracket it (same "
        "process)"
    ),
    "flop_speedup": (
        "FLOPs of one un-accelerated generation of the first prompt / the variant's (torch FlopCounterMode, CPU "
        "attention counted); block calls and the bound cover every prompt, so for adaptive methods the two can differ"
    ),
    "block_calls": (
        "block computations, counted when a block's first attention module computes its query projection; summed over "
        "prompts"
    ),
    "cache_bytes": (
        "peak bytes of the tensors held in the state of the diffusers hooks on the transformer (plans and peers alike)"
    ),
    "block_call_speedup": "all block calls / computed block calls, summed over prompts",
    "matched": (
        "each method's frontier (its points no other point of the same method beats on both block-call speedup and "
        "pooled PSNR) interpolated linearly in log block-call speedup, the worst-caption PSNR read on the same "
        "frontier; 'not reached' where the target lies outside a method's measured range; lead = auto − best peer"
    ),
    "bound": "T / (T_c + (T - T_c)·rho) with T_c = T·(computed / total block calls) and rho the non-block share of the "
    "un-accelerated run's FLOPs: the speedup if skipped block calls cost nothing; skipping only inside a block "
    "(PAB, TaylorSeer) counts as a skipped block, so the bound overstates what those methods can reach",
}


SPEEDS = {"flop_speedup": "FLOP speedup", "wall_speedup": "wall speedup"}
#: Block-call speedups at which `matched` compares `auto` with the best peer.
MATCHED_TARGETS = (1.5, 2.0, 2.5, 3.0)


def build_report(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary plus definitions and the comparison of our `auto` plans with each peer's curve, by FLOP speedup
    (immune to machine load) and by wall speedup."""
    return {
        **summary,
        "definitions": DEFINITIONS,
        "standing": {speed: standing(summary["rows"], speed=speed) for speed in SPEEDS},
        "matched": matched(summary["rows"]),
    }


def frontier(points: list[dict[str, Any]], speed: str = "block_call_speedup") -> list[dict[str, Any]]:
    """The points of one method that no other of its points beats on both `speed` and pooled PSNR, by speed."""
    finite = [p for p in points if math.isfinite(p[speed]) and p[speed] > 0]
    return sorted((p for p in finite if not any(_dominates(q, p, speed) for q in finite)), key=lambda p: p[speed])


def _at_speed(curve: list[dict[str, Any]], key: str, target: float, speed: str) -> float | None:
    """`key` at `target` speed on a frontier, linear in log speed; None outside its range. Infinite PSNR (a prompt
    left untouched) is capped at 100 dB so the interpolation stays finite."""
    pairs = [(math.log(p[speed]), min(p[key], 100.0)) for p in curve]
    if not pairs or not pairs[0][0] - 1e-9 <= math.log(target) <= pairs[-1][0] + 1e-9:
        return None
    xs, ys = zip(*pairs)
    return float(np.interp(math.log(target), xs, ys))


def matched(
    rows: list[dict[str, Any]], targets: tuple[float, ...] = MATCHED_TARGETS, speed: str = "block_call_speedup"
) -> list[dict[str, Any]]:
    """At each target speedup: `auto`'s pooled and worst-caption PSNR, the best peer's of each, and the leads."""
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in _ok(rows):
        if row["kind"] == "peer" or (row["kind"] == "plan" and row["method"] == OURS):
            methods.setdefault(OURS if row["kind"] == "plan" else row["method"], []).append(row)
    curves = {name: frontier(points, speed) for name, points in methods.items()}
    result = []
    for target in targets:
        entry: dict[str, Any] = {"speedup": target}
        for key in ("psnr", "psnr_min"):
            ours = _at_speed(curves.get(OURS, []), key, target, speed)
            peers = {n: _at_speed(c, key, target, speed) for n, c in curves.items() if n != OURS}
            reached = {n: v for n, v in peers.items() if v is not None}
            best = max(reached, key=reached.get) if reached else None
            entry[key] = {
                "auto": ours,
                "best_peer": best,
                "peer": reached.get(best) if best else None,
                "lead": None if ours is None or best is None else ours - reached[best],
            }
        result.append(entry)
    return result


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def standing(rows: list[dict[str, Any]], ours: str = OURS, speed: str = "wall_speedup") -> list[dict[str, Any]]:
    """For each `ours` point and each peer: the peer's speed (the `speed` column) at equal PSNR and PSNR at equal
    speed (interpolated on its curve, None outside its range), and which of the peer's points dominate it or it
    dominates."""
    points = [r for r in _ok(rows) if r["method"] == ours and r["kind"] == "plan"]
    peers: dict[str, list[dict[str, Any]]] = {}
    for row in _ok(rows):
        if row["kind"] == "peer":
            peers.setdefault(row["method"], []).append(row)
    result = []
    for point in points:
        quality = point["psnr"]
        for peer, curve in peers.items():
            result.append(
                {
                    "ours": point["name"],
                    "peer": peer,
                    "ours_speedup": point[speed],
                    "ours_psnr": quality,
                    "peer_speedup_at_equal_psnr": _interpolate(curve, "psnr", speed, quality),
                    "peer_psnr_at_equal_speedup": _interpolate(curve, speed, "psnr", point[speed]),
                    "dominated_by": [r["name"] for r in curve if _dominates(r, point, speed)],
                    "dominates": [r["name"] for r in curve if _dominates(point, r, speed)],
                }
            )
    return result


def _interpolate(curve: list[dict[str, Any]], x_key: str, y_key: str, x: float) -> float | None:
    """y at x on the curve's points sorted by x (linear), or None when x lies outside them."""
    pairs = sorted((r[x_key], r[y_key]) for r in curve if math.isfinite(r[x_key]) and math.isfinite(r[y_key]))
    if not pairs or not math.isfinite(x) or not pairs[0][0] <= x <= pairs[-1][0]:
        return None
    xs, ys = zip(*pairs)
    return float(np.interp(x, xs, ys))


def _dominates(a: dict[str, Any], b: dict[str, Any], speed: str) -> bool:
    """a is at least as fast and as faithful as b, and strictly better in one."""
    return a[speed] >= b[speed] and a["psnr"] >= b["psnr"] and (a[speed] > b[speed] or a["psnr"] > b["psnr"])


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: header, table, what did not run, where `auto` stands, definitions."""
    lines = _header(report) + [""] + _table(report) + [""]
    lines += _section("Not applicable", [f"{k}: {v}" for k, v in report["not_applicable"].items()])
    lines += _section("Not fitted", [f"{k}: {v}" for k, v in report["not_fitted"].items()])
    lines += _section(
        f"`{OURS}` against the best peer at matched block-call speedups (pooled / worst-caption PSNR, dB)",
        _matched_lines(report.get("matched", [])),
    )
    for speed, label in SPEEDS.items():
        entries = report["standing"][speed]
        lines += _section(
            f"Where `{OURS}` stands against each peer ({label}, pooled PSNR)",
            [_standing_line(e, label) for e in entries],
        )
    lines += _section(
        "Definitions",
        [f"**{k}**: {v}" for k, v in report["definitions"].items()] + [f"**rho** (this run): {report['rho']:.4f}"],
    )
    return "\n".join(lines).rstrip() + "\n"


def _matched_lines(entries: list[dict[str, Any]]) -> list[str]:
    def value(number: float | None) -> str:
        return "not reached" if number is None else f"{number:.1f}"

    def lead(number: float | None) -> str:
        return "—" if number is None else f"{number:+.1f}"

    lines = []
    for e in entries:
        pooled, worst = e["psnr"], e["psnr_min"]
        lines.append(
            f"{e['speedup']:g}x: auto {value(pooled['auto'])} / {value(worst['auto'])}; best peer "
            f"{pooled['best_peer'] or '—'} {value(pooled['peer'])} / {worst['best_peer'] or '—'} {value(worst['peer'])}"
            f"; lead {lead(pooled['lead'])} / {lead(worst['lead'])}"
        )
    return lines


def _header(report: dict[str, Any]) -> list[str]:
    model, settings = report["model"], report["settings"]
    lines = [
        f"## dit-bench: {model['name']}",
        "",
        f"{model['transformer_class']} ({model['blocks']} blocks, CFG {model['cfg_mode']}), "
        f"{settings['steps']} steps, guidance {settings['guidance']:g}, {len(settings['prompts'])} prompt(s), "
        f"median of {settings['repeats']} interleaved round(s), "
        f"{settings['device']} {settings['dtype']}, torch {settings['torch']}, diffusers {settings['diffusers']}.",
    ]
    runs = report["rows"][0]["run_seconds"]
    lines.append(
        f"{len(runs)} un-accelerated generations took {min(runs):.2f} to {max(runs):.2f} s (spread "
        f"{max(runs) / min(runs) - 1:.0%}): the timing noise each wall speedup is measured under."
    )
    files = model["weights"].get("files", [])
    if files:
        lines.append("Weights measured: " + "; ".join(f"`{f['path']}` modified {f['modified']}" for f in files) + ".")
    if not model["fidelity_meaningful"]:
        lines.append("**Random weights: PSNR, SSIM and LPIPS are meaningless here; read the speed columns only.**")
    if settings["device"].startswith("cpu"):
        lines.append(
            "Memory on CPU: the cache MB column is the bytes held by the hooks' caches (no allocator peak on CPU)."
        )
    return lines


def _table(report: dict[str, Any]) -> list[str]:
    lpips = any(r.get("lpips") is not None for r in report["rows"])
    cuda = any(r.get("peak_cuda_bytes") is not None for r in report["rows"])
    head = [
        "method",
        "setting",
        "wall speedup",
        "FLOP speedup",
        "PSNR dB",
        "worst dB",
        "SSIM",
        *(["LPIPS"] if lpips else []),
        "block calls",
        "cache MB",
        *(["peak CUDA GB"] if cuda else []),
        "bound",
        "wall / bound",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cells(row, lpips, cuda)) + " |")
    return lines


def _cells(row: dict[str, Any], lpips: bool, cuda: bool) -> list[str]:
    setting = {"peer": row["name"].partition(" ")[2], "baseline": "—"}.get(row["kind"], row["name"])
    if row["status"].startswith("failed"):
        blanks = 8 + lpips + cuda
        return [row["method"], setting, *["—"] * blanks, row["status"]]
    nothing = row["status"] == "skipped nothing"
    speeds = ["skipped nothing"] * 2 if nothing else [f"{row['wall_speedup']:.2f}x", f"{row['flop_speedup']:.2f}x"]
    calls = row["block_calls"]
    cells = [
        row["method"],
        setting,
        *speeds,
        _db(row["psnr"]),
        _db(row.get("psnr_min", row["psnr"])),
        f"{row['ssim']:.4f}",
    ]
    cells += [f"{row['lpips']:.4f}"] if lpips else []
    cells += [f"{calls['computed']}/{calls['total']}", f"{row['cache_bytes'] / 1e6:.2f}"]
    cells += [f"{(row['peak_cuda_bytes'] or 0) / 1e9:.2f}"] if cuda else []
    cells += [f"{row['bound']:.2f}x", "—" if nothing else f"{row['wall_of_bound']:.0%}", _note(row)]
    return cells


def _note(row: dict[str, Any]) -> str:
    if row["status"] == "reference":
        return f"reference, {row['wall_s']:.2f} s"
    if row["status"] == "skipped nothing":
        return "skipped nothing: no block or attention call saved"
    predicted = row["setting"].get("predicted_speedup")
    return f"predicted {predicted:.2f}x FLOPs" if isinstance(predicted, (int, float)) else ""


def _db(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _section(title: str, items: list[str]) -> list[str]:
    return [f"### {title}", "", *[f"- {item}" for item in items], ""] if items else []


def _standing_line(entry: dict[str, Any], label: str) -> str:
    peer, speed, quality = entry["peer"], entry["ours_speedup"], entry["ours_psnr"]
    at_psnr, at_speed = entry["peer_speedup_at_equal_psnr"], entry["peer_psnr_at_equal_speedup"]
    parts = [f"{entry['ours']} ({speed:.2f}x {label}, {_db(quality)} dB) vs {peer}:"]
    parts.append(
        f"at equal PSNR {peer} runs {at_psnr:.2f}x ({'ours faster' if speed > at_psnr else 'peer faster'});"
        if at_psnr is not None
        else f"{peer}'s curve does not reach {_db(quality)} dB within its measured points;"
    )
    parts.append(
        f"at equal speed {peer} gets {_db(at_speed)} dB ({'ours higher' if quality > at_speed else 'peer higher'})."
        if at_speed is not None
        else f"{peer}'s curve does not span {speed:.2f}x."
    )
    if entry["dominated_by"]:
        parts.append(f"Dominated by {', '.join(entry['dominated_by'])}.")
    if entry["dominates"]:
        parts.append(f"Dominates {', '.join(entry['dominates'])}.")
    return " ".join(parts)


def to_json(report: dict[str, Any]) -> str:
    """The report as JSON; infinite PSNR (identical videos) is written as the string "inf"."""
    return json.dumps(_jsonable(report), indent=2) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    return value


def pareto_figure(report: dict[str, Any]) -> Figure:
    """PSNR against FLOP speedup and against wall speedup, one curve per method (points that skipped nothing or
    failed are left out)."""
    figure = Figure(figsize=(12, 5), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, (speed, label) in zip(panels, SPEEDS.items()):
        _plot_curves(axes, report["rows"], speed)
        axes.set_xlabel(label + (" (median of interleaved rounds)" if speed == "wall_speedup" else " (one generation)"))
        axes.grid(True, alpha=0.3)
    panels[0].set_ylabel("PSNR vs un-accelerated, dB (global MSE)")
    title = f"{report['model']['name']}, {report['settings']['steps']} steps"
    figure.suptitle(
        title if report["model"]["fidelity_meaningful"] else f"{title}: random weights, PSNR is meaningless",
        fontsize=10,
    )
    return figure


def pareto_png(report: dict[str, Any]) -> bytes:
    """The :func:`pareto_figure` as PNG bytes."""
    buffer = io.BytesIO()
    pareto_figure(report).savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _plot_curves(axes: Any, rows: list[dict[str, Any]], speed: str) -> None:
    """One line per method through its points sorted by speed; our plans solid, peers dashed."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in _ok(rows):
        if math.isfinite(row["psnr"]):
            curves.setdefault(row["method"], []).append((row[speed], row["psnr"]))
    ours = {row["method"] for row in rows if row["kind"] == "plan"}
    for method, points in curves.items():
        xs, ys = zip(*sorted(points))
        mine = method in ours
        axes.plot(
            xs,
            ys,
            marker="o" if mine else "s",
            linestyle="-" if mine else "--",
            linewidth=2.2 if mine else 1.2,
            label=method,
        )
    if curves:
        axes.legend(fontsize=8)


def write_outputs(out_dir: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Write every file under `out_dir`: all to temporary files first, then each renamed into place."""
    return write_files_atomic(out_dir, files)
