"""Post-NMS diff: match one backend's detections to the reference's, and give every mismatch
exactly one cause, read from the fates both pipelines' NMS recorded when replayed in trace mode
on their own candidates (harness.align.pipelines).

A mismatch is a detection one side has and the other lacks (no same-class detection at
IoU >= 0.5), or a matched pair whose score or box moved beyond tolerance. Causes:

- topk_cut: the other side cut the candidate by its pre-NMS top-k (nms_pre, topK).
- score_edge: the other side scored it on the wrong side of its score threshold.
- iou_edge: the other side suppressed it at an IoU within `iou_band` of the thresholds
  (or between two different thresholds).
- tie_order: equal scores, ordered differently (at a top-k / max-det boundary, or between the
  box and its suppressor).
- max_det_cut: the other side cut it by its max detections / keep-topk.
- nms_mode: class-agnostic vs per-class suppression, best class vs multi-label.
- drift: the same candidate kept by both, but its box or score moved (beyond tolerance, or so
  far that the match failed).
- unexplained: the fates do not decide (shown, never hidden).

A detection one side keeps because the other side's suppressor is missing there is explained
by why that suppressor is missing (followed up to `MAX_DEPTH` links).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from harness.nms.trace import FateKind

CAUSES = ("topk_cut", "score_edge", "iou_edge", "tie_order", "max_det_cut", "nms_mode",
          "drift", "unexplained")
MAX_DEPTH = 4
# fates that reached NMS proper (passed threshold and top-k)
_PAST_TOPK = (FateKind.KEPT, FateKind.SUPPRESSED, FateKind.CUT_MAX_DETECTIONS)


@dataclass(frozen=True)
class Tolerances:
    """match_iou: IoU for two detections to be the same object; score / box_px: drift allowed
    in a matched pair (absolute score, pixels in the original image); iou_band: how close to
    the IoU threshold a suppression counts as an IoU edge."""

    match_iou: float = 0.5
    score: float = 1e-3
    box_px: float = 0.5
    iou_band: float = 0.02


@dataclass
class Mismatch:
    """side: which pipeline has the detection ("reference" or "target"; "both" for drift of a
    matched pair); box: candidate row; rank/limit for cuts."""

    image: str
    side: str
    cls: int
    score: float
    box: int
    cause: str
    detail: str
    rank: Optional[int] = None
    limit: Optional[int] = None


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a (M, 4) and b (K, 4), float64; two zero-area boxes have
    IoU 1 when they coincide (within 1e-3 px), else 0."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    # two zero-area boxes (clamped to the image border) are the same box when they coincide
    same = np.all(np.abs(a[:, None, :] - b[None, :, :]) <= 1e-3, axis=2)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), same.astype(np.float64))


def match(ref: Any, tgt: Any, iou: float = 0.5) -> tuple[list[tuple[int, int]], list[int],
                                                         list[int]]:
    """Greedy matching by descending reference score: each reference detection takes the
    unmatched target detection of its class with the highest IoU >= `iou`. Returns
    (pairs (ref row, target row), unmatched reference rows, unmatched target rows)."""
    order = np.argsort(-np.asarray(ref.scores), kind="stable")
    ious = box_iou(ref.boxes, tgt.boxes)
    same = np.asarray(ref.labels)[:, None] == np.asarray(tgt.labels)[None, :]
    ious = np.where(same, ious, -1.0)
    taken = np.zeros(len(tgt.scores), bool)
    pairs, lonely = [], []
    for r in order.tolist():
        row = np.where(taken, -1.0, ious[r]) if len(taken) else ious[r]
        j = int(np.argmax(row)) if row.size else -1
        if j >= 0 and row[j] >= iou:
            taken[j] = True
            pairs.append((r, j))
        else:
            lonely.append(r)
    return pairs, sorted(lonely), [int(j) for j in np.nonzero(~taken)[0]]


def _tied_at_boundary(side: Any, score: float, fates_past: tuple) -> bool:
    """Whether a candidate cut at a top-k / max-det boundary has the same score as one that
    made it past that boundary on the same side."""
    code = side.result.trace.code
    past = np.isin(code, [int(k) for k in fates_past])
    return bool(past.any()) and float(np.min(side.scores[past])) == float(np.float32(score))


class Explainer:
    """Causes for one image, given both sides' replays (reference, target)."""

    def __init__(self, image: str, reference: Any, target: Any, tol: Tolerances):
        self.image = image
        self.sides = {"reference": reference, "target": target}
        self.tol = tol
        self.aligned = reference.scores.shape == target.scores.shape

    def explain(self, present: str, box: int, cls: int, depth: int = 0) -> tuple[str, str, Any]:
        """(cause, detail, fate) for candidate (box, cls) kept on side `present` and missing
        on the other side."""
        absent = "target" if present == "reference" else "reference"
        if not self.aligned:
            return "unexplained", "the two sides have different candidate sets", None
        if depth > MAX_DEPTH:
            return "unexplained", "suppression chain too long to follow", None
        a, b = self.sides[present], self.sides[absent]
        fate = b.result.trace.fate(box, cls)
        kind = fate.kind
        where = f"{absent}: {fate}"
        if kind == FateKind.KEPT:
            return "drift", f"kept by both, moved too far to match ({where})", fate
        if kind in (FateKind.BELOW_SCORE_THRESHOLD, FateKind.OBJECTNESS_FILTERED):
            return "score_edge", (f"{where}; {present} score {a.scores[box, cls]:.6g}"), fate
        if kind == FateKind.CUT_PRE_NMS_TOPK:
            if _tied_at_boundary(b, b.scores[box, cls], _PAST_TOPK):
                return "tie_order", f"{where}, tied with the last candidate kept", fate
            return "topk_cut", where, fate
        if kind == FateKind.CUT_MAX_DETECTIONS:
            if _tied_at_boundary(b, b.scores[box, cls], (FateKind.KEPT,)):
                return "tie_order", f"{where}, tied with the last detection kept", fate
            return "max_det_cut", where, fate
        if kind in (FateKind.NOT_BEST_CLASS, FateKind.BACKGROUND_CLASS):
            return "nms_mode", where, fate
        if kind == FateKind.SUPPRESSED:
            return self._suppressed(present, absent, box, cls, fate, depth)
        return "unexplained", where, fate

    def _suppressed(self, present: str, absent: str, box: int, cls: int, fate: Any,
                    depth: int) -> tuple[str, str, Any]:
        a, b = self.sides[present], self.sides[absent]
        j, cj = fate.by_box, fate.by_class
        where = f"{absent}: {fate}"
        if cj != cls and (a.per_class != b.per_class):
            return "nms_mode", f"{where}; {present} suppresses per class", fate
        if b.scores[j, cj] == b.scores[box, cls]:
            return "tie_order", f"{where}; both score {b.scores[box, cls]:.6g}", fate
        other = a.result.trace.fate(j, cj)
        if other.kind == FateKind.KEPT:
            # both kept the suppressor; only this side's IoU comparison removed the box
            iou_a = float(box_iou(a.boxes[box], a.boxes[j])[0, 0])
            lo = min(a.iou_threshold, b.iou_threshold) - self.tol.iou_band
            hi = max(a.iou_threshold, b.iou_threshold) + self.tol.iou_band
            if lo <= fate.iou <= hi:
                return "iou_edge", (f"{where}; {present} IoU {iou_a:.4f} vs threshold "
                                    f"{a.iou_threshold:g}"), fate
            pair = [box, j]
            if np.allclose(a.boxes[pair], b.boxes[pair], atol=1e-3):
                # same boxes, different verdict: the pipelines measure IoU differently
                return "iou_edge", (f"{where}; same boxes, but {present} computes IoU "
                                    f"{iou_a:.4f} (threshold {a.iou_threshold:g})"), fate
            return "drift", f"{where}; {present} IoU {iou_a:.4f}: the boxes moved", fate
        if other.kind == FateKind.SUPPRESSED and (other.by_box, other.by_class) == (box, cls):
            # each side kept one of the pair and suppressed the other with it
            if a.scores[j, cj] == a.scores[box, cls]:
                return "tie_order", f"{where}; {present} ranks the tied pair the other way", fate
            return "drift", (f"{where}; the pair's scores swap order: {present} "
                             f"{a.scores[box, cls]:.6g} vs {a.scores[j, cj]:.6g}, {absent} "
                             f"{b.scores[box, cls]:.6g} vs {b.scores[j, cj]:.6g}"), fate
        # the suppressor is missing on the other side: that is the reason
        cause, detail, _ = self.explain(absent, j, cj, depth + 1)
        return cause, f"{where}, a box {present} lacks because {detail}", fate

    def moved(self, r: int, t: int, ds: float, db: float) -> Mismatch:
        """A matched pair beyond tolerance: drift when both kept the same candidate; when the
        target kept another candidate for the object, why it lacks the reference's one."""
        ref = self.sides["reference"].result
        tgt = self.sides["target"].result
        box, cls = int(ref.box_index[r]), int(ref.labels[r])
        moved = f"score {ref.scores[r]:.6g} → {tgt.scores[t]:.6g}, box moved up to {db:.3g} px"
        other = int(tgt.box_index[t])
        if box < 0 or other < 0 or (other, int(tgt.labels[t])) == (box, cls) \
                or not self.aligned:
            return Mismatch(self.image, "both", cls, float(ref.scores[r]), box, "drift", moved)
        cause, detail, fate = self.explain("reference", box, cls)
        m = Mismatch(self.image, "both", cls, float(ref.scores[r]), box, cause,
                     f"matched to another candidate (row {other}), {moved}; {detail}")
        if fate is not None and cause in ("topk_cut", "max_det_cut", "tie_order"):
            m.rank, m.limit = fate.rank, fate.limit
        return m

    def mismatch(self, present: str, row: int) -> Mismatch:
        side = self.sides[present]
        res = side.result
        box, cls = int(res.box_index[row]), int(res.labels[row])
        if box < 0:
            return Mismatch(self.image, present, cls, float(res.scores[row]), box,
                            "unexplained", "the pipeline does not say which candidate this is")
        cause, detail, fate = self.explain(present, box, cls)
        rank = limit = None
        if fate is not None and fate.kind in (FateKind.CUT_PRE_NMS_TOPK,
                                              FateKind.CUT_MAX_DETECTIONS) and \
                cause in ("topk_cut", "max_det_cut", "tie_order"):
            rank, limit = fate.rank, fate.limit
        return Mismatch(self.image, present, cls, float(res.scores[row]), box, cause, detail,
                        rank, limit)


@dataclass
class DetectionDiff:
    """Counts and mismatches over all images of one target."""

    tol: Tolerances = field(default_factory=Tolerances)
    reference: int = 0
    target: int = 0
    matched: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    def add_image(self, image: str, reference: Any, target: Any) -> list[Mismatch]:
        """reference, target: pipelines.Replayed of one image."""
        ref, tgt = reference.result, target.result
        pairs, lonely_ref, lonely_tgt = match(ref, tgt, self.tol.match_iou)
        ex = Explainer(image, reference, target, self.tol)
        found = [ex.mismatch("reference", r) for r in lonely_ref]
        found += [ex.mismatch("target", t) for t in lonely_tgt]
        for r, t in pairs:
            ds = abs(float(ref.scores[r]) - float(tgt.scores[t]))
            db = float(np.max(np.abs(ref.boxes[r] - tgt.boxes[t])))
            if ds > self.tol.score or db > self.tol.box_px:
                found.append(ex.moved(r, t, ds, db))
        self.reference += len(ref)
        self.target += len(tgt)
        self.matched += len(pairs)
        self.mismatches += found
        return found

    def summary(self, class_names: Sequence[str] = (), examples: int = 12) -> dict[str, Any]:
        causes = dict.fromkeys(CAUSES, 0)
        for m in self.mismatches:
            causes[m.cause] += 1
        total = self.reference + self.target
        # examples: the highest-scoring mismatches of each cause first
        by_cause: dict[str, list[Mismatch]] = {}
        for m in sorted(self.mismatches, key=lambda m: -m.score):
            by_cause.setdefault(m.cause, []).append(m)
        picked: list[Mismatch] = []
        while len(picked) < examples and any(by_cause.values()):
            for cause in CAUSES:
                if by_cause.get(cause) and len(picked) < examples:
                    picked.append(by_cause[cause].pop(0))
        name = (lambda c: class_names[c] if 0 <= c < len(class_names) else str(c))
        return {
            "reference": self.reference, "target": self.target, "matched": self.matched,
            # detections in both, over detections in either (F1-like: extras count too)
            "match_rate": 2 * self.matched / total if total else 1.0,
            "mismatches": len(self.mismatches), "unexplained": causes["unexplained"],
            "causes": causes,
            "tolerances": {"match_iou": self.tol.match_iou, "score": self.tol.score,
                           "box_px": self.tol.box_px, "iou_band": self.tol.iou_band},
            "examples": [{"image": m.image, "cause": m.cause, "side": m.side,
                          "class": name(m.cls), "score": m.score, "box": m.box,
                          "rank": m.rank, "limit": m.limit, "detail": m.detail}
                         for m in picked],
        }
