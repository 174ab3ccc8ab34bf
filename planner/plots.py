"""Matplotlib figures of plans and profiles (object-oriented API, no pyplot state: safe under Agg and in notebooks).

Each `*_axes` helper draws on a given `Axes`, so notebooks can compose them; `plan_figure` assembles the `inspect`
figure: drift heatmap (when a profile is at hand), schedule grid (expected compute for adaptive policies), block
labels and PCA explained variance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from runtime.plan import Plan

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


def labels_axes(ax: Axes, scores: np.ndarray, labels: Sequence[str], block_ids: Sequence[str], threshold: float | None = None) -> None:
    """Foreground scores per block, coloured by label, with the labelling threshold."""
    colours = ["#c53030" if label == "foreground" else "#718096" if label == "background" else "#cbd5e0" for label in labels]
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
            pca_axes(ax, [plan.arrays[f"pca_explained.{b}"] for b in blocks], [plan.arrays[f"pca.{b}"].shape[-1] for b in blocks], ids)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Write a figure (format from the suffix) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
