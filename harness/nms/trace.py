"""Trace mode shared by every reference NMS kernel: one fate per (box, class) candidate, saying
which pipeline step removed it (docs/nms-semantics.md "What trace mode records"), and
`NmsResult`, the per-image output every kernel returns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import numpy as np

# code of a candidate no step has decided yet; a finished trace has none (check_complete)
UNSET = -1


class FateKind(IntEnum):
    """What happened to one (box, class) candidate. The numeric value is `Trace.code`."""

    KEPT = 0
    BELOW_SCORE_THRESHOLD = 1
    CUT_PRE_NMS_TOPK = 2
    SUPPRESSED = 3
    CUT_MAX_DETECTIONS = 4
    NOT_BEST_CLASS = 5
    OBJECTNESS_FILTERED = 6
    # Two steps the SPEC's list leaves out but real pipelines have: mmdet's optional
    # min_bbox_size filter (_bbox_post_process) and the TensorRT plugins' background class.
    BELOW_MIN_BBOX_SIZE = 7
    BACKGROUND_CLASS = 8
    # two-stage detectors: the (RoI, class) candidate does not exist on this side because its
    # proposal does not (the other side's RPN made it); why is the proposal diff's business
    PROPOSAL_MISSING = 9

    @property
    def label(self) -> str:
        """The name used in `Trace.counts()` and reports, e.g. "cut_pre_nms_topk"."""
        return self.name.lower()


def _distinct_pair(a: float, b: float, fixed: bool) -> tuple[str, str]:
    """Format two numbers with as few digits as still show them different (if they are)."""
    for digits in range(3, 10):
        fmt = f".{digits}f" if fixed else f".{digits + 1}g"
        sa, sb = format(a, fmt), format(b, fmt)
        if sa != sb or a == b:
            return sa, sb
    return sa, sb


@dataclass(frozen=True)
class Fate:
    """One candidate's fate with only the fields relevant to its kind (others are None).

    rank: KEPT -> output row; CUT_PRE_NMS_TOPK -> position in the pre-NMS sorted order;
    CUT_MAX_DETECTIONS -> position among NMS survivors in output order. limit: the k that cut it.
    by_box/by_class: the suppressor (SUPPRESSED) or, for NOT_BEST_CLASS, by_class is the box's
    best class. score: the score the pipeline compared (objectness for OBJECTNESS_FILTERED;
    logit for EfficientNMS with score_activation). inclusive: the step compares with >=.
    """

    kind: FateKind
    score: Optional[float] = None
    threshold: Optional[float] = None
    inclusive: Optional[bool] = None
    rank: Optional[int] = None
    limit: Optional[int] = None
    by_box: Optional[int] = None
    by_class: Optional[int] = None
    iou: Optional[float] = None

    def __str__(self) -> str:
        k = self.kind
        if k == FateKind.KEPT:
            return f"kept (output row {self.rank})"
        if k in (FateKind.BELOW_SCORE_THRESHOLD, FateKind.OBJECTNESS_FILTERED):
            what = "objectness" if k == FateKind.OBJECTNESS_FILTERED else "score"
            score = self.score if self.score is not None else math.nan
            s, t = _distinct_pair(score, self.threshold, fixed=False)
            # a strict (>) pipeline drops score <= thr; an inclusive (>=) one drops score < thr
            op = "<" if self.inclusive else "<="
            return f"{what} {s} {op} threshold {t}"
        if k == FateKind.CUT_PRE_NMS_TOPK:
            return f"cut by pre-NMS top-k: rank {self.rank} >= k = {self.limit}"
        if k == FateKind.SUPPRESSED:
            i, t = _distinct_pair(self.iou, self.threshold, fixed=True)
            op = ">=" if self.inclusive else ">"
            return f"suppressed by box {self.by_box} (class {self.by_class}) at IoU {i} {op} {t}"
        if k == FateKind.CUT_MAX_DETECTIONS:
            return f"cut by max detections: rank {self.rank} >= k = {self.limit}"
        if k == FateKind.NOT_BEST_CLASS:
            return f"not the box's best class (best is class {self.by_class})"
        if k == FateKind.BELOW_MIN_BBOX_SIZE:
            return f"box width or height <= min_bbox_size {self.threshold:g}"
        if k == FateKind.PROPOSAL_MISSING:
            return "no such proposal on this side"
        return "background class"


_FIELD_FILL = {"rank": -1, "limit": -1, "by_box": -1, "by_class": -1,
               "iou": np.nan, "threshold": np.nan, "score": np.nan, "inclusive": False}


@dataclass
class Trace:
    """Fates of all N x C candidates of one image, as parallel (N, C) arrays.

    code: int8 FateKind value (UNSET only while a kernel runs). rank, limit, by_box, by_class:
    int32, -1 where not applicable. iou, threshold, score: float32, nan where not applicable.
    inclusive: bool, True where the deciding comparison was >= rather than >. About 30 bytes
    per candidate: 8400 boxes x 80 classes take 20 MB.
    """

    pipeline: str
    code: np.ndarray
    rank: np.ndarray
    limit: np.ndarray
    by_box: np.ndarray
    by_class: np.ndarray
    iou: np.ndarray
    threshold: np.ndarray
    inclusive: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls, num_boxes: int, num_classes: int, pipeline: str) -> "Trace":
        """A trace with every candidate UNSET, for a kernel to fill."""
        shape = (num_boxes, num_classes)
        i32 = lambda: np.full(shape, -1, np.int32)  # noqa: E731
        f32 = lambda: np.full(shape, np.nan, np.float32)  # noqa: E731
        return cls(pipeline=pipeline, code=np.full(shape, UNSET, np.int8), rank=i32(),
                   limit=i32(), by_box=i32(), by_class=i32(), iou=f32(), threshold=f32(),
                   inclusive=np.zeros(shape, bool), score=f32())

    @property
    def num_boxes(self) -> int:
        return self.code.shape[0]

    @property
    def num_classes(self) -> int:
        return self.code.shape[1]

    def record(self, box: np.ndarray, cls: np.ndarray, kind: FateKind, **fields: object) -> None:
        """Set the fate of candidates (box[i], cls[i]) (broadcastable index arrays).

        fields: any of rank, limit, by_box, by_class, iou, threshold, score, inclusive
        (scalars or arrays broadcastable to the indices); others keep their n/a value.
        """
        unknown = set(fields) - set(_FIELD_FILL)
        if unknown:
            raise TypeError(f"unknown trace fields: {sorted(unknown)}")
        self.code[box, cls] = int(kind)
        for name, fill in _FIELD_FILL.items():
            getattr(self, name)[box, cls] = fields.get(name, fill)

    def fate(self, box: int, cls: int) -> Fate:
        """The fate of candidate (box, cls), with the fields its kind uses."""
        code = int(self.code[box, cls])
        if code == UNSET:
            raise ValueError(f"candidate (box {box}, class {cls}) has no fate recorded")
        kind = FateKind(code)
        f = {name: getattr(self, name)[box, cls] for name in _FIELD_FILL}
        score = float(f["score"]) if not math.isnan(f["score"]) else None
        thr = float(f["threshold"])
        if kind == FateKind.KEPT:
            return Fate(kind, score=score, rank=int(f["rank"]))
        if kind in (FateKind.BELOW_SCORE_THRESHOLD, FateKind.OBJECTNESS_FILTERED):
            return Fate(kind, score=score, threshold=thr, inclusive=bool(f["inclusive"]))
        if kind in (FateKind.CUT_PRE_NMS_TOPK, FateKind.CUT_MAX_DETECTIONS):
            return Fate(kind, score=score, rank=int(f["rank"]), limit=int(f["limit"]))
        if kind == FateKind.SUPPRESSED:
            return Fate(kind, score=score, threshold=thr, inclusive=bool(f["inclusive"]),
                        by_box=int(f["by_box"]), by_class=int(f["by_class"]),
                        iou=float(f["iou"]))
        if kind == FateKind.NOT_BEST_CLASS:
            return Fate(kind, score=score, by_class=int(f["by_class"]))
        if kind == FateKind.BELOW_MIN_BBOX_SIZE:
            return Fate(kind, threshold=thr, inclusive=bool(f["inclusive"]))
        return Fate(kind)

    def counts(self) -> dict[str, int]:
        """Number of candidates per fate (every kind listed; "unset" only if some are)."""
        values = np.bincount(self.code.ravel().astype(np.int64) + 1,
                             minlength=len(FateKind) + 1)
        out = {kind.label: int(values[int(kind) + 1]) for kind in FateKind}
        if values[0]:
            out["unset"] = int(values[0])
        return out

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """(box, class) index arrays of the kept candidates, in output-row order."""
        box, cls = np.nonzero(self.code == FateKind.KEPT)
        order = np.argsort(self.rank[box, cls], kind="stable")
        return box[order], cls[order]

    def check_complete(self) -> None:
        """Raise if any candidate has no fate (a kernel bug, never a user error)."""
        missing = int(np.count_nonzero(self.code == UNSET))
        if missing:
            raise RuntimeError(f"{self.pipeline} trace: {missing} candidates have no fate")


@dataclass
class NmsResult:
    """Detections of one image, in the pipeline's output order.

    boxes: (K, 4) float32 (xyxy for mmyolo; see each kernel for its layout);
    scores: (K,) float32; labels: (K,) int64 class; box_index: (K,) int64 row of the input boxes.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    box_index: np.ndarray
    trace: Optional[Trace] = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, trace: Optional[Trace] = None) -> "NmsResult":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64), np.zeros(0, np.int64), trace)


def finished(result: "NmsResult") -> "NmsResult":
    """`result` after checking its trace (when it has one) gives every candidate a fate:
    how every kernel returns."""
    if result.trace is not None:
        result.trace.check_complete()
    return result
