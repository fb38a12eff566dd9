"""The two steps every reference kernel shares: a descending score sort whose tie order is an
explicit parameter (docs/nms-semantics.md "TopK": tie order is a pipeline property, not an
accident), and the greedy suppression loop, with each pipeline's own IoU arithmetic passed in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np

# "stable": among equal scores the lower index comes first (onnx reference, onnxruntime CPU,
# cub radix sorts in the TensorRT plugins). "reverse": the higher index first — a what-if for
# sorts that promise nothing (torch.sort / torch.topk, TensorRT's INMSLayer): a detection that
# changes between the two orders is decided by a tie.
TieOrder = Literal["stable", "reverse"]
TIE_ORDERS = ("stable", "reverse")


def check_tie_order(tie_order: str) -> None:
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {tie_order!r}")


def descending_order(scores: np.ndarray, tie_order: TieOrder = "stable") -> np.ndarray:
    """Indices that sort `scores` (M,) descending, ties broken as `tie_order` says; NaN last."""
    check_tie_order(tie_order)
    keys = -np.asarray(scores)
    if tie_order == "stable":
        return np.argsort(keys, kind="stable")
    m = keys.shape[0]
    return (m - 1) - np.argsort(keys[::-1], kind="stable")


@dataclass
class Suppression:
    """Outcome of greedy NMS over M items.

    kept: (K,) item ids in the order they were kept (the visiting order).
    by: (M,) item id of the first kept item that suppressed each item, -1 if none.
    iou: (M,) float32 IoU with that suppressor, nan if none.
    """

    kept: np.ndarray
    by: np.ndarray
    iou: np.ndarray


# iou_against(i, js) -> float32: the pipeline's IoU of kept item i with items js, in the
# pipeline's own float32 arithmetic and argument order. Element-wise, so index arrays i and js
# broadcast (a column against a row gives the whole matrix).
IouFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# groups up to this size get their IoU matrix at once (1 MB), which saves the per-box numpy
# calls that dominate small NMS problems
_MATRIX_MAX = 512
# larger ones go a block of the next items at a time (at most _MATRIX_MAX, and their IoUs
# against the rest at most this many cells: 4 MB of float32 per temporary) instead of one kept
# box at a time against the rest: a random-init YOLOX's 100k detections per image spent 61 s
# of a 3-photo `harness compare` in that per-box loop, ~80 numpy calls per kept box
_CELLS = 1 << 20


def greedy_suppress(order: np.ndarray, num_items: int, iou_against: IouFn, threshold: float,
                    inclusive: bool, groups: Optional[np.ndarray] = None) -> Suppression:
    """Greedy NMS: visit items in `order`; an item still alive is kept and suppresses every later
    alive item of its group whose IoU with it is > threshold (>= when `inclusive`).

    order: (M',) item ids in visiting order (items not listed are never visited).
    groups: (num_items,) group id per item, or None for one group. Items of different groups
    never suppress each other; callers use it only where the pipeline's own IoU could not
    reach the threshold across groups (per-class NMS, mmcv's separated class offsets).
    Never stops early: kernels with an output limit cut the survivors afterwards, which gives
    the same output as stopping (greedy decisions depend only on earlier items) and lets the
    trace say what would have removed each later candidate.
    """
    thr = np.float32(threshold)
    by = np.full(num_items, -1, np.int64)
    ious = np.full(num_items, np.nan, np.float32)
    order = np.asarray(order, np.int64)
    if groups is None:
        parts = [order]
    else:
        g = np.asarray(groups)[order]
        by_group = np.argsort(g, kind="stable")  # keeps visiting order inside each group
        bounds = np.flatnonzero(np.diff(g[by_group])) + 1
        parts = np.split(order[by_group], bounds)
    kept_mask = np.zeros(num_items, bool)
    for remaining in parts:
        while remaining.size:
            # the next items alive (a group of at most _MATRIX_MAX: all of it), as many as
            # keep the block x rest IoUs within _CELLS: greedy among themselves (their
            # matrix), then every later item not yet suppressed against the block's kept ones
            # at once — suppressed by the first of them (in visiting order) it overlaps, as
            # one at a time would have
            size = max(1, min(_MATRIX_MAX, _CELLS // remaining.size))
            block, rest = remaining[:size], remaining[size:]
            if block.size > 1:
                _suppress_with_matrix(block, iou_against, thr, inclusive, kept_mask, by, ious)
            else:
                kept_mask[block] = True
            kept = block[kept_mask[block]]
            if rest.size and kept.size:
                iou = iou_against(kept[:, None], rest[None, :])
                hit = iou >= thr if inclusive else iou > thr
                hit_any = hit.any(axis=0)
                cols = np.flatnonzero(hit_any)
                if cols.size:
                    first = hit[:, cols].argmax(axis=0)
                    by[rest[cols]] = kept[first]
                    ious[rest[cols]] = iou[first, cols]
                    rest = rest[~hit_any]
            remaining = rest
    # kept ids in visiting order, merging the groups back
    kept = order[kept_mask[order]]
    return Suppression(kept=kept, by=by, iou=ious)


def _suppress_with_matrix(items: np.ndarray, iou_against: IouFn, thr: np.float32,
                          inclusive: bool, kept_mask: np.ndarray, by: np.ndarray,
                          ious: np.ndarray) -> None:
    """The same greedy loop over `items` (visiting order) with all IoUs computed up front."""
    mat = iou_against(items[:, None], items[None, :])
    hit = mat >= thr if inclusive else mat > thr
    alive = np.ones(items.size, bool)
    for p in range(items.size):
        if not alive[p]:
            continue
        kept_mask[items[p]] = True
        later = np.flatnonzero(hit[p, p + 1:] & alive[p + 1:]) + (p + 1)
        if later.size:
            alive[later] = False
            by[items[later]] = items[p]
            ious[items[later]] = mat[p, later]
