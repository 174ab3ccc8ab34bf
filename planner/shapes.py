"""Static schedule shapes: protected steps, ProfilingDiT refresh intervals, UniCP EDCW windows, span grouping."""

from __future__ import annotations

import math

import numpy as np

from dit_accel.runtime.plan import COMPUTE, PRUNE, REUSE

from .predict import Predictor, blended_error


def protected_steps(steps: int, warmup: int, protect_last: int) -> np.ndarray:
    """Boolean [steps]: the first `warmup` and last `protect_last` steps, which every plan computes in full."""
    mask = np.zeros(steps, dtype=bool)
    mask[:warmup] = True
    mask[max(steps - protect_last, 0) :] = True
    return mask


def longest_reuse_run(rows: np.ndarray) -> np.ndarray:
    """Length of the longest run of consecutive REUSE steps in each row (works on [..., steps])."""
    run = np.zeros(rows.shape[:-1], dtype=np.int64)
    longest = run.copy()
    for column in np.moveaxis(rows, -1, 0):
        run = np.where(column == REUSE, run + 1, 0)
        longest = np.maximum(longest, run)
    return longest


def corrector_fronts(blocks: int) -> tuple[int, ...]:
    """How many leading blocks a corrector schedule may keep computing: none, about an eighth and a quarter of the
    stack (1 and 2 of 8 blocks; 4 and 8 of 30, near DBCache's default F8), always leaving two or more to reuse."""
    depths = {0, math.ceil(blocks / 8), math.ceil(blocks / 4)}
    return tuple(sorted(d for d in depths if d <= blocks - 2))


def group_spans(actions: np.ndarray, alone: np.ndarray | None = None) -> tuple[tuple[int, int], ...]:
    """Half-open ranges of ≥ 2 contiguous blocks with identical action rows that reuse at least once.

    Cached as one tensor, such a span replays exactly like its blocks cached one by one (the span residual is the sum
    of the block residuals, all recorded at the same steps), with one cache entry instead of several. Blocks marked
    `alone` (those that blend pruned and cached outputs, which the runtime needs per block) join no span.
    """
    alone = np.zeros(actions.shape[0], dtype=bool) if alone is None else alone
    spans = []
    start = 0
    for block in range(1, actions.shape[0] + 1):
        if (
            block == actions.shape[0]
            or alone[block]
            or alone[start]
            or not np.array_equal(actions[block], actions[start])
        ):
            if block - start >= 2 and np.any(actions[start] == REUSE):
                spans.append((start, block))
            start = block
    return tuple(spans)


def merge_windows(actions: np.ndarray, max_tensors: int, block_flops: np.ndarray) -> np.ndarray:
    """`actions` with contiguous blocks merged into groups that share one window row, until at most `max_tensors`
    groups reuse at all (each replays as one span, cached in one tensor per CFG branch).

    A merged group reuses a step only where every block in it reused it, and computes in full otherwise (pruning
    dropped). Adjacent groups are merged greedily, cheapest first: the cost of a merge is the FLOPs of the reuse cells
    it turns into compute steps.
    """
    bounds = [[block, block + 1] for block in range(actions.shape[0])]
    merged = actions.copy()
    while sum(bool(np.any(merged[a:b] == REUSE)) for a, b in bounds) > max_tensors:
        costs = [_merge_cost(merged, block_flops, a[0], b[1]) for a, b in zip(bounds, bounds[1:])]
        best = int(np.argmin(costs))
        start, stop = bounds[best][0], bounds[best + 1][1]
        bounds[best : best + 2] = [[start, stop]]
        merged[start:stop] = np.where(np.all(merged[start:stop] == REUSE, axis=0), REUSE, COMPUTE)
    return merged


def _merge_cost(actions: np.ndarray, block_flops: np.ndarray, start: int, stop: int) -> float:
    shared = np.all(actions[start:stop] == REUSE, axis=0)
    lost = (actions[start:stop] == REUSE) & ~shared
    return float(lost.sum(axis=1) @ block_flops[start:stop])


def blending_blocks(actions: np.ndarray, dws_weight: np.ndarray | None) -> np.ndarray:
    """Blocks with a prune step whose DWS weight blends in the cached output (weight < 1)."""
    if dws_weight is None:
        return np.zeros(actions.shape[0], dtype=bool)
    return np.any((actions == PRUNE) & (dws_weight < 1.0), axis=1)


def interval_row(steps: int, start: int, protect_last: int, longest: int, shortest: int) -> np.ndarray:
    """ProfilingDiT schedule of a cached block: compute steps ≤ `start`, then refresh every T_s steps.

    T_s = longest − (longest − shortest)·(s − start)/(steps − start) shrinks linearly from `longest` to `shortest`
    (the decreasing interval of their ablation; equal values give their fixed interval). Between refreshes the block is
    reused; the last `protect_last` steps are computed.
    """
    row = np.full(steps, REUSE, dtype=np.uint8)
    row[:start] = COMPUTE
    step = start
    while step < steps:
        row[step] = COMPUTE
        interval = longest - (longest - shortest) * (step - start) / max(steps - start, 1)
        step += max(int(round(interval)), 1)
    row[max(steps - protect_last, 0) :] = COMPUTE
    return row


def edcw_actions(
    predictor: Predictor, threshold: float, protected: np.ndarray, max_window: int, prune: bool
) -> np.ndarray:
    """UniCP EDCW windows with PCAS prune steps: a block reuses while its reuse error stays under its threshold.

    The error of reusing block b at step s is the step-weighted error of its cache, ω_s·cached[b, s] (see
    `predict.py`); a window closes when it would exceed threshold / block_weight[b], so windows shrink where drift
    spikes and foreground blocks (weight > 1) refresh more often. A step that closes a window is pruned (with `prune`)
    when the pruned-and-blended error stays under the same threshold, else computed in full.
    """
    blocks, steps = predictor.shape
    actions = np.zeros((blocks, steps), dtype=np.uint8)
    for block in range(blocks):
        can_prune = prune and predictor.pruned_flops[block] < predictor.block_flops[block]
        limit = threshold / predictor.block_weight[block]
        actions[block] = _window_row(predictor, block, limit, protected, max_window, can_prune)
    return actions


def _window_row(
    predictor: Predictor, block: int, limit: float, protected: np.ndarray, max_window: int, prune: bool
) -> np.ndarray:
    """One block's EDCW row, stepping through the cache error exactly as `predict.cache_errors` does."""
    drift, weight, prune_error = predictor.drift[block], predictor.step_weight, predictor.prune_error[block]
    row = np.zeros(len(drift), dtype=np.uint8)
    cache, stale, run = 0.0, 0.0, 0
    for step in range(len(drift)):
        stale += drift[step]
        if protected[step]:
            cache, stale, run = 0.0, 0.0, 0
            continue
        if run < max_window and weight[step] * (cache + stale) <= limit:
            row[step], run = REUSE, run + 1
            continue
        blended = float(blended_error(np.float64(prune_error[step]), np.float64(cache + stale)))
        if prune and weight[step] * blended <= limit:
            row[step], cache = PRUNE, blended
        else:
            cache = 0.0
        stale, run = 0.0, 0
    return row
