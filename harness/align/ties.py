"""Detections that depend on the order of tied scores. torch.sort (mmyolo), TensorRT's plugins
on a GPU and most NMS implementations promise no order among equal scores, so a detection whose
fate an equal-scored candidate could have taken is decided by an order nobody guarantees: the
report counts these, and never calls two outputs in agreement without saying how many there are.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from harness.nms.trace import FateKind

# fates of candidates that entered the ranking (passed the score threshold)
RANKED = [int(k) for k in (FateKind.KEPT, FateKind.SUPPRESSED, FateKind.CUT_PRE_NMS_TOPK,
                           FateKind.CUT_MAX_DETECTIONS)]
CUT = [int(k) for k in (FateKind.CUT_PRE_NMS_TOPK, FateKind.CUT_MAX_DETECTIONS)]
# IoU blocks are computed this many elements at a time
_BLOCK = 1 << 22


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, K) IoU of xyxy boxes a (M, 4) and b (K, 4); 0 where the union is empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class TieIndex:
    """One side's ranked candidates sorted by score, built once per image and side: which
    scores are shared, and whether a top-k / max-det cut fell inside a run of equal scores."""

    def __init__(self, side: Any):
        code = side.result.trace.code
        box, cls = np.nonzero(np.isin(code, RANKED))
        score = side.scores[box, cls]
        order = np.argsort(score, kind="stable")
        self.box, self.cls, self.score = box[order], cls[order], score[order]
        self.cuts_before = np.concatenate(
            [[0], np.cumsum(np.isin(code[self.box, self.cls], CUT))])
        self.scores = side.scores
        self.boxes = np.asarray(side.boxes, np.float64)  # (N, 4) or per class (N, C, 4)
        self.iou_threshold = float(side.settings.iou_threshold)
        self.per_class = bool(side.per_class)

    def dependent(self, box: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """(K,) bool for candidates (box[i], cls[i]) of this side's output."""
        box = np.asarray(box, np.int64).reshape(-1)
        cls = np.asarray(cls, np.int64).reshape(-1)
        out = np.zeros(box.shape[0], bool)
        rows = np.flatnonzero(box >= 0)
        if not rows.size or not self.score.size:
            return out
        s = self.scores[box[rows], cls[rows]]
        lo = np.searchsorted(self.score, s, "left")
        hi = np.searchsorted(self.score, s, "right")
        tied = hi - lo >= 2
        # a cut inside the run: which of the equal scores made it was the order's choice
        cut = tied & (self.cuts_before[hi] - self.cuts_before[lo] > 0)
        out[rows[cut]] = True
        rest = tied & ~cut
        for start, end in sorted(set(zip(lo[rest].tolist(), hi[rest].tolist()))):
            self._overlapping(rows[rest & (lo == start)], box, cls, start, end, out)
        return out

    def _overlapping(self, members: np.ndarray, box: np.ndarray, cls: np.ndarray, lo: int,
                     hi: int, out: np.ndarray) -> None:
        """Mark the members of one run of equal scores that overlap an equal-scored candidate
        they compete with (same class unless class-agnostic) at IoU >= the threshold."""
        mates_b, mates_c = self.box[lo:hi], self.cls[lo:hi]
        groups = np.unique(cls[members]) if self.per_class else [None]
        for c in groups:
            mine = members if c is None else members[cls[members] == c]
            mates = np.unique(mates_b if c is None else mates_b[mates_c == c])
            if mates.size < 2:
                continue
            step = max(1, _BLOCK // mates.size)
            for k in range(0, mine.size, step):
                part = mine[k:k + step]
                if self.boxes.ndim == 3:  # per-class boxes: the group's class
                    iou = _iou(self.boxes[box[part], cls[part]], self.boxes[mates, c])
                else:
                    iou = _iou(self.boxes[box[part]], self.boxes[mates])
                iou[box[part][:, None] == mates[None, :]] = 0.0  # not with itself
                out[part[(iou >= self.iou_threshold).any(axis=1)]] = True


def tie_index(side: Any) -> TieIndex:
    """The side's TieIndex, built on first use and kept on the side."""
    index = getattr(side, "_tie_index", None)
    if index is None:
        index = TieIndex(side)
        side._tie_index = index
    return index


def tie_dependent(side: Any, box: Any, cls: Any) -> np.ndarray:
    """For the detections (box[i], cls[i]) of one side (a pipelines.Replayed), whether another
    candidate with exactly the same score could have taken its place: one at a top-k or
    max-detections boundary inside the run of equal scores, or one it competes with in NMS (same
    class, any class for a class-agnostic NMS) overlapping it at IoU >= the side's threshold.
    (K,) bool."""
    return tie_index(side).dependent(box, cls)
