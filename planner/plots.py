"""Matplotlib figures of plans and profiles (object-oriented API, no pyplot state: safe under Agg and in notebooks).

Each `*_axes` helper draws on a given `Axes`, so notebooks can compose them; `plan_figure` assembles the `inspect`
figure: drift heatmap (when a profile is at hand), schedule grid (expected compute for adaptive policies), block
labels and PCA explained variance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from dit_accel.runtime.plan import Plan

ACTION_COLOURS = ListedColormap(["#2b6cb0", "#e2e8f0", "#dd6b20"])


def drift_axes(ax: Axes, drift: np.ndarray, block_ids: Sequence[str]) -> None:
    """Heatmap of residual drift [blocks, steps] (relative L1 between adjacent steps; step 0 has none)."""
    image = ax.imshow(np.ma.masked_invalid(drift), aspect="auto", interpolation="nearest", cmap="magma")
    ax.figure.colorbar(image, ax=ax, label="residual rel. L1 drift")
    _block_axis(ax, block_ids)
    ax.set_xlabel("step")
    ax.set_title("profiled residual drift")


def schedule_axes(ax: Axes, actions: np.ndarray, block_ids: Sequence[str]) -> None:
    """The schedule grid: compute (blue), reuse (light), prune (orange) per block and step."""
    ax.imshow(actions, aspect="auto", interpolation="nearest", cmap=ACTION_COLOURS, vmin=0, vmax=2)
    _block_axis(ax, block_ids)
    ax.set_xlabel("step")
    ax.set_title("schedule: compute (blue) / reuse (light) / prune (orange)")


def expected_compute_axes(ax: Axes, expected: np.ndarray, block_ids: Sequence[str]) -> None:
    """Share of profiled replays of an adaptive policy that compute each block at each step."""
    image = ax.imshow(expected, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
    ax.figure.colorbar(image, ax=ax, label="share computed")
    _block_axis(ax, block_ids)
    ax.set_xlabel("step")
    ax.set_title("adaptive policy: expected compute in profiled replays")


def labels_axes(
    ax: Axes, scores: np.ndarray, labels: Sequence[str], block_ids: Sequence[str], threshold: float | None = None
) -> None:
    """Foreground scores per block, coloured by label, with the labelling threshold."""
    colours = [
        "#c53030" if label == "foreground" else "#718096" if label == "background" else "#cbd5e0" for label in labels
    ]
    ax.bar(np.arange(len(scores)), scores, color=colours)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
        ax.legend(loc="upper right")
    ax.set_xticks(np.arange(len(block_ids)), block_ids, rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("foreground share of high attention")
    ax.set_title("block labels (red foreground, grey background)")


def pca_axes(ax: Axes, explained: Sequence[np.ndarray], ranks: Sequence[int], block_ids: Sequence[str]) -> None:
    """Explained q/k variance per head (dots) and the kept rank (bars, right axis) of every block."""
    for block, values in enumerate(explained):
        ax.scatter(np.full(len(values), block), values, color="#2b6cb0", s=12)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("explained variance per head")
    ax.set_xticks(np.arange(len(block_ids)), block_ids, rotation=90, fontsize=7)
    twin = ax.twinx()
    twin.bar(np.arange(len(ranks)), ranks, alpha=0.25, color="#dd6b20")
    twin.set_ylabel("rank kept")
    ax.set_title("PCAS bases")


def _block_axis(ax: Axes, block_ids: Sequence[str]) -> None:
    ax.set_yticks(np.arange(len(block_ids)), block_ids, fontsize=7)
    ax.set_ylabel("block")


def schedule_spans_axes(
    ax: Axes, actions: np.ndarray, block_ids: Sequence[str], spans: Sequence[tuple[int, int]]
) -> None:
    """The schedule grid with the plan's spans (blocks cached as one residual) outlined."""
    schedule_axes(ax, actions, block_ids)
    for start, _ in spans:
        ax.axhline(start - 0.5, color="black", linewidth=1.2)
    ax.axhline(len(block_ids) - 0.5, color="black", linewidth=1.2)
    ax.set_title(f"{ax.get_title()}; {len(spans)} span(s) outlined")


def drift_figure(drift: np.ndarray, branches: Sequence[str], block_ids: Sequence[str]) -> Figure:
    """Residual drift heatmaps [branch, step, block] (averaged over prompts): one per CFG branch, then their mean."""
    panels = [(name, drift[i]) for i, name in enumerate(branches)] + [("mean over branches", np.nanmean(drift, axis=0))]
    figure = Figure(figsize=(10, 2.8 * len(panels)), layout="constrained")
    for ax, (name, values) in zip(figure.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        drift_axes(ax, values.T, block_ids)
        ax.set_title(f"residual drift: {name}")
    return figure


def frames_figure(frames: np.ndarray, title: str, cmap: str = "viridis", images: np.ndarray | None = None) -> Figure:
    """One panel per frame of a [frames, height, width] map (attention, mask), over the video frames if given."""
    count = frames.shape[0]
    figure = Figure(figsize=(1.6 * count + 1, 2.2), layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    vmin, vmax = float(np.nanmin(frames)), float(np.nanmax(frames))
    for index, ax in enumerate(axes):
        if images is not None:
            ax.imshow(images[index], extent=(-0.5, frames.shape[2] - 0.5, frames.shape[1] - 0.5, -0.5))
        image = ax.imshow(
            frames[index],
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            alpha=0.55 if images is not None else 1.0,
            interpolation="nearest",
        )
        ax.set_title(f"frame {index}", fontsize=8)
        ax.set_axis_off()
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    figure.suptitle(title, fontsize=10)
    return figure


def cross_attention_figure(
    cross: np.ndarray, query_index: np.ndarray, grid: tuple[int, int, int], words: Sequence[str]
) -> Figure:
    """Cross-attention of the sampled video queries to each text token, placed on the (height, width) grid.

    `cross` is [query, text_token]; `query_index` the flat (frame, height, width) token index of every query. Each
    panel shows, per grid cell, the mean attention its sampled queries (over all frames) pay to one word; cells
    without a sampled query are blank.
    """
    frames, height, width = grid
    cells = np.asarray(query_index) % (height * width)
    figure = Figure(figsize=(1.7 * len(words) + 1, 2.3), layout="constrained")
    axes = figure.subplots(1, len(words), squeeze=False)[0]
    counts = np.bincount(cells, minlength=height * width).astype(np.float64)
    for token, (ax, word) in enumerate(zip(axes, words)):
        sums = np.bincount(cells, weights=cross[:, token].astype(np.float64), minlength=height * width)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(counts > 0, sums / counts, np.nan).reshape(height, width)
        ax.imshow(mean, cmap="magma", interpolation="nearest", vmin=0, vmax=float(np.nanmax(cross[:, : len(words)])))
        ax.set_title(word, fontsize=8)
        ax.set_axis_off()
    return figure


def motion_axes(ax: Axes, motion: np.ndarray, branches: Sequence[str]) -> None:
    """AdaCache's motion score per step ([branch, step], averaged over prompts and blocks), one line per branch."""
    for index, name in enumerate(branches):
        ax.plot(motion[index], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("motion score")
    ax.set_title("motion (MoReg) per step")
    ax.legend()


def prediction_axes(
    ax: Axes,
    predicted_error: Sequence[float],
    psnr: Sequence[float],
    names: Sequence[str],
    offset_db: float | None = None,
) -> None:
    """Validated PSNR against the planner's predicted error (log x), with the model PSNR ≈ C − 20·log10(error)."""
    errors = np.asarray(predicted_error, dtype=np.float64)
    ax.scatter(errors, psnr, color="#2b6cb0", zorder=3)
    for x, y, name in zip(errors, psnr, names):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if offset_db is not None and errors.size:
        line = np.geomspace(errors.min() * 0.8, errors.max() * 1.25, 50)
        ax.plot(
            line,
            offset_db - 20 * np.log10(line),
            color="#dd6b20",
            linestyle="--",
            label=f"{offset_db:.1f} − 20·log10(error)",
        )
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("predicted error")
    ax.set_ylabel("validated PSNR (dB)")
    ax.set_title("predicted vs validated")


def plan_figure(plan: Plan, drift: np.ndarray | None = None) -> Figure:
    """The inspect figure of a plan; `drift` [blocks, steps] adds the profiled drift heatmap."""
    panels = ["drift"] if drift is not None else []
    panels.append("expected" if "expected_compute" in plan.arrays else "schedule")
    if any(label != "unlabelled" for label in plan.labels):
        panels.append("labels")
    if "pca.0" in plan.arrays:
        panels.append("pca")
    figure = Figure(figsize=(10, 3.2 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    ids = plan.model.block_ids
    for ax, panel in zip(axes, panels):
        if panel == "drift":
            drift_axes(ax, drift, ids)
        elif panel == "schedule":
            schedule_axes(ax, plan.actions, ids)
        elif panel == "expected":
            expected_compute_axes(ax, plan.arrays["expected_compute"], ids)
        elif panel == "labels":
            labels_axes(ax, plan.label_scores, plan.labels, ids, plan.provenance.get("labels", {}).get("threshold"))
        else:
            blocks = range(plan.num_blocks)
            pca_axes(
                ax,
                [plan.arrays[f"pca_explained.{b}"] for b in blocks],
                [plan.arrays[f"pca.{b}"].shape[-1] for b in blocks],
                ids,
            )
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write a figure (format from the suffix) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
