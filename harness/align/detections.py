"""Post-NMS diff: match one backend's detections to the reference's, and give every mismatch
exactly one cause, read from the fates both pipelines' NMS recorded when replayed in trace mode
on their own candidates (harness.align.pipelines).

A mismatch is a detection one side has and the other lacks (no same-class detection at
IoU >= 0.5; boxes of (almost) zero width or height match by corner distance instead), or a
matched pair whose score or box moved beyond tolerance. Causes:

- nms_settings: the two NMS are set up differently (score or IoU threshold beyond the edge
  bands, or an IoU formula that decides the pair on the same boxes: BatchedNMS's +1 px), or
  the other side's settings make its output empty (named once, with both values).
- topk_cut: the other side cut the candidate by its pre-NMS top-k (nms_pre, topK).
- score_edge: the other side scored it on the wrong side of its score threshold, within the
  score tolerance of it (or both sides have the same threshold).
- iou_edge: the other side suppressed it at an IoU within `iou_band` of its threshold, or the
  two compute IoU differently for the same boxes.
- tie_order: equal scores, ordered differently (at a top-k / max-det boundary, between the box
  and its suppressor, or in torch's unstable sort where the replay orders ties another way).
- max_det_cut: the other side cut it by its max detections / keep-topk.
- nms_mode: class-agnostic vs per-class suppression, best class vs multi-label.
- nonfinite: its score or box is inf / NaN on one side (fp16 overflow).
- proposal_missing (two-stage): the other side has no proposal for its RoI; the proposal
  diff's reason (harness.align.proposals: TopK cut per level, NMS scope, cap, ...) follows.
- roi_align (two-stage): born in RoIAlign — both sides have the same proposal and agree up to
  the RPN, their RoI features do not (harness.align.compare relabels the numeric causes).
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

from harness.align.matching import box_iou, match
from harness.align.ties import tie_dependent
from harness.nms.trace import FateKind
from harness.results import DetectionSummary, MismatchExample, SettingDifference

CAUSES = ("nms_settings", "topk_cut", "score_edge", "iou_edge", "tie_order", "max_det_cut",
          "nms_mode", "nonfinite", "proposal_missing", "roi_align", "drift", "unexplained")
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
    # boxes narrower or lower than this match by corner distance (IoU says 0 for a
    # zero-width box and its twin moved 1e-4 px)
    degenerate_px: float = 1.0


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
    # the NMS setting whose difference decided it (nms_settings, and top-k / max-det cuts
    # where the two sides' limits differ)
    setting: Optional[str] = None
    # a matched pair (side "both"): the target's candidate row, when not `box`
    target_box: Optional[int] = None


@dataclass
class Why:
    """One mismatch's cause, the sentence behind it, the fate it was read from and, where a
    settings difference decided it, which setting."""

    cause: str
    detail: str
    fate: Any = None
    setting: Optional[str] = None


def _fmt(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


class Explainer:
    """Causes for one image, given both sides' replays (reference, target)."""

    def __init__(self, image: str, reference: Any, target: Any, tol: Tolerances):
        self.image = image
        self.sides = {"reference": reference, "target": target}
        self.tol = tol
        self.aligned = reference.scores.shape == target.scores.shape
        self._lowest_past: dict[tuple[str, tuple], float] = {}
        # per side: whether every score, box and head value it decoded is finite (then no
        # candidate of it needs looking at one by one), and its ties asked for in advance
        self._finite: dict[str, bool] = {}
        self._ties: dict[str, dict[tuple[int, int], bool]] = {"reference": {}, "target": {}}

    def ask_ties(self, side: str, box: np.ndarray, cls: np.ndarray) -> None:
        """Whether each candidate (box[i], cls[i]) of `side` depends on an order of equal
        scores, found for all at once (what explaining the other side's lonely detections
        one by one asks of this side; one candidate at a time took ~80 us)."""
        box, cls = np.asarray(box, np.int64), np.asarray(cls, np.int64)
        dep = tie_dependent(self.sides[side], box, cls)
        self._ties[side].update(zip(zip(box.tolist(), cls.tolist()), dep.tolist()))

    def _tie_dependent(self, side: str, box: int, cls: int) -> bool:
        known = self._ties[side].get((box, cls))
        return bool(tie_dependent(self.sides[side], [box], [cls])[0]) if known is None \
            else known

    def _all_finite(self, name: str) -> bool:
        if name not in self._finite:
            side = self.sides[name]
            self._finite[name] = bool(np.isfinite(side.scores).all() and
                                      np.isfinite(side.boxes).all() and
                                      (side.nonfinite is None or not side.nonfinite.any()))
        return self._finite[name]

    def _tied_at_boundary(self, side: str, score: float, fates_past: tuple) -> bool:
        """Whether a candidate cut at a top-k / max-det boundary of `side` has the same score
        as one that made it past that boundary there."""
        key = (side, fates_past)
        if key not in self._lowest_past:
            s = self.sides[side]
            past = np.isin(s.result.trace.code, [int(k) for k in fates_past])
            self._lowest_past[key] = float(np.min(s.scores[past])) if past.any() else np.nan
        return self._lowest_past[key] == float(np.float32(score))

    def _nonfinite(self, box: int, cls: int) -> Optional[str]:
        """Which side has an inf / NaN score or box for candidate (box, cls), if any."""
        if all(self._all_finite(name) for name in self.sides):
            return None
        found = []
        for name, side in self.sides.items():
            if box >= side.scores.shape[0]:
                continue
            if not np.isfinite(side.scores[box, cls]):
                found.append(f"{name} score {side.scores[box, cls]}")
            if not np.isfinite(side.box(box, cls)).all():
                found.append(f"{name} box {np.round(side.box(box, cls), 2).tolist()}")
            elif side.nonfinite is not None and side.nonfinite[box, cls]:
                found.append(f"{name} decoded it from inf / NaN head values (score "
                             f"{side.scores[box, cls]:.6g})")
        return ", ".join(found) if found else None

    def explain(self, present: str, box: int, cls: int, depth: int = 0) -> Why:
        """Why candidate (box, cls), kept on side `present`, is missing on the other side."""
        absent = "target" if present == "reference" else "reference"
        a, b = self.sides[present], self.sides[absent]
        if b.settings.problem:
            return Why("nms_settings", f"{absent}: {b.settings.problem}", setting="problem")
        if not self.aligned:
            return Why("unexplained", "the two sides have different candidate sets")
        if depth > MAX_DEPTH:
            return Why("unexplained", "suppression chain too long to follow")
        bad = self._nonfinite(box, cls)
        if bad:
            return Why("nonfinite", f"non-finite candidate: {bad}")
        fate = b.result.trace.fate(box, cls)
        kind = fate.kind
        where = f"{absent}: {fate}"
        if kind == FateKind.PROPOSAL_MISSING:
            why = (b.missing_proposals or {}).get(box)
            if why is None:
                return Why("unexplained", f"{absent} has no proposal for it", fate)
            return Why("proposal_missing", f"{absent} has no such proposal ({why.cause.replace('_', ' ')}: "
                                           f"{why.detail})", fate, why.setting)
        if kind == FateKind.KEPT:
            if not b.outputs_pair(box, cls):
                # the replay keeps it; the side's own output (mmyolo: torch's unstable sort)
                # does not, which only an order of equal scores can do
                if self._tie_dependent(absent, box, cls):
                    return Why("tie_order", f"{absent}'s own sort ordered equal scores another "
                                            "way than its replay (which keeps it)", fate)
                return Why("unexplained", f"{absent}'s replay keeps it but its own output does "
                                          "not, and no equal score explains that", fate)
            return Why("drift", f"kept by both, moved too far to match ({where})", fate)
        if kind in (FateKind.BELOW_SCORE_THRESHOLD, FateKind.OBJECTNESS_FILTERED):
            return self._below_threshold(present, absent, box, cls, fate)
        if kind in (FateKind.CUT_PRE_NMS_TOPK, FateKind.CUT_MAX_DETECTIONS):
            topk = kind == FateKind.CUT_PRE_NMS_TOPK
            past = _PAST_TOPK if topk else (FateKind.KEPT,)
            if self._tied_at_boundary(absent, b.scores[box, cls], past):
                last = "candidate" if topk else "detection"
                return Why("tie_order", f"{where}, tied with the last {last} kept", fate)
            setting = "pre_topk" if topk else (
                "max_per_class" if b.settings.max_per_class is not None
                and fate.limit == b.settings.max_per_class
                and fate.limit != b.settings.max_detections else "max_detections")
            differs = getattr(a.settings, setting) != getattr(b.settings, setting)
            return Why("topk_cut" if topk else "max_det_cut", where, fate,
                       setting if differs else None)
        if kind in (FateKind.NOT_BEST_CLASS, FateKind.BACKGROUND_CLASS):
            return Why("nms_mode", where, fate)
        if kind == FateKind.SUPPRESSED:
            return self._suppressed(present, absent, box, cls, fate, depth)
        return Why("unexplained", where, fate)

    def _below_threshold(self, present: str, absent: str, box: int, cls: int,
                         fate: Any) -> Why:
        a, b = self.sides[present], self.sides[absent]
        score = float(a.scores[box, cls])
        where = f"{absent}: {fate}; {present} score {score:.6g}"
        if "score_threshold" not in a.settings.differences(b.settings):
            return Why("score_edge", where, fate)
        mine, theirs = a.settings.score_threshold, b.settings.score_threshold
        if fate.kind == FateKind.OBJECTNESS_FILTERED or \
                abs(score - float(fate.threshold)) <= self.tol.score:
            return Why("score_edge", where, fate)
        return Why("nms_settings", f"score threshold {_fmt(theirs)} ({absent}) vs "
                                   f"{_fmt(mine)} ({present}): {present} score {score:.6g}",
                   fate, "score_threshold")

    @staticmethod
    def _formula_decides(a: Any, b: Any, box: int, j: int, cls: int,
                         cj: int) -> Optional[str]:
        """When the two NMS compute IoU by different formulas: whether, on the present side's
        own boxes, the absent side's formula crosses its threshold where the present side's
        does not — the formula, not the boxes, decided. Says so with both values."""
        from harness.align.pipelines import iou_by_formula, iou_family

        fa, fb = a.settings.iou_formula, b.settings.iou_formula
        if iou_family(fa) == iou_family(fb):
            return None
        pair = a.box(box, cls).astype(np.float64), a.box(j, cj).astype(np.float64)
        iou_fa, iou_fb = iou_by_formula(*pair, fa), iou_by_formula(*pair, fb)
        t_a, t_b = a.settings.iou_threshold, b.settings.iou_threshold
        over_b = iou_fb >= t_b if b.settings.iou_inclusive else iou_fb > t_b
        over_a = iou_fa >= t_a if a.settings.iou_inclusive else iou_fa > t_a
        if not over_b or over_a:
            return None
        return (f"IoU formula {fb} gives {iou_fb:.4f} > {t_b:g}, {fa} gives {iou_fa:.4f} on "
                "the same boxes")

    def _suppressed(self, present: str, absent: str, box: int, cls: int, fate: Any,
                    depth: int) -> Why:
        a, b = self.sides[present], self.sides[absent]
        j, cj = fate.by_box, fate.by_class
        where = f"{absent}: {fate}"
        if cj != cls and (a.per_class != b.per_class):
            return Why("nms_mode", f"{where}; {present} suppresses per class", fate)
        if b.scores[j, cj] == b.scores[box, cls]:
            return Why("tie_order", f"{where}; both score {b.scores[box, cls]:.6g}", fate)
        if a.outputs_pair(j, cj):
            # both kept the suppressor; only this side's IoU comparison removed the box
            iou_a = float(box_iou(a.box(box, cls), a.box(j, cj))[0, 0])
            t_a, t_b = a.settings.iou_threshold, b.settings.iou_threshold
            said = f"{where}; {present} IoU {iou_a:.4f} vs threshold {t_a:g}"
            formula = self._formula_decides(a, b, box, j, cls, cj)
            if formula:
                return Why("nms_settings", f"{where}; {formula}", fate, "iou_formula")
            if abs(fate.iou - t_b) <= self.tol.iou_band:
                return Why("iou_edge", said, fate)
            if "iou_threshold" in a.settings.differences(b.settings) and \
                    min(t_a, t_b) - self.tol.iou_band <= iou_a <= max(t_a, t_b):
                return Why("nms_settings", f"IoU threshold {t_b:g} ({absent}) vs {t_a:g} "
                                           f"({present}): {where}", fate, "iou_threshold")
            moved = max(float(np.max(np.abs(a.box(box, cls) - b.box(box, cls)))),
                        float(np.max(np.abs(a.box(j, cj) - b.box(j, cj)))))
            if moved <= 1e-3:
                fa, fb = a.settings.iou_formula, b.settings.iou_formula
                if fa != fb:
                    # same boxes, different verdict: the pipelines measure IoU differently
                    return Why("iou_edge", f"{where}; same boxes, but {present} computes IoU "
                                           f"{fa} ({iou_a:.4f}, threshold {t_a:g}) and "
                                           f"{absent} {fb}", fate)
                # same formula, boxes a hair apart: the pipeline's own float32 arithmetic
                # (mmcv's class offset rounds tiny boxes) turned the hair into this IoU
                return Why("drift", f"{where}; the boxes moved {moved:.2g} px, and the NMS's "
                                    f"{fb} arithmetic gives IoU {fate.iou:.4f} where the exact "
                                    f"value is {iou_a:.4f} (tiny boxes)", fate)
            return Why("drift", f"{where}; {present} IoU {iou_a:.4f}: the boxes moved "
                                f"{moved:.2g} px", fate)
        other = a.result.trace.fate(j, cj)
        if other.kind == FateKind.SUPPRESSED and (other.by_box, other.by_class) == (box, cls):
            # each side kept one of the pair and suppressed the other with it
            if a.scores[j, cj] == a.scores[box, cls]:
                return Why("tie_order", f"{where}; {present} ranks the tied pair the other "
                                        "way", fate)
            return Why("drift", (f"{where}; the pair's scores swap order: {present} "
                                 f"{a.scores[box, cls]:.6g} vs {a.scores[j, cj]:.6g}, {absent} "
                                 f"{b.scores[box, cls]:.6g} vs {b.scores[j, cj]:.6g}"), fate)
        # the suppressor is missing on the other side: that is the reason
        why = self.explain(absent, j, cj, depth + 1)
        return Why(why.cause, f"{where}, a box {present} lacks because {why.detail}", fate,
                   why.setting)

    def _mismatch(self, side: str, cls: int, score: float, box: int, why: Why,
                  detail: Optional[str] = None) -> Mismatch:
        m = Mismatch(self.image, side, cls, score, box, why.cause, detail or why.detail,
                     setting=why.setting)
        f = why.fate
        if f is not None and f.kind in (FateKind.CUT_PRE_NMS_TOPK,
                                        FateKind.CUT_MAX_DETECTIONS) and \
                why.cause in ("topk_cut", "max_det_cut", "tie_order"):
            m.rank, m.limit = f.rank, f.limit
        return m

    def moved(self, r: int, t: int, ds: float, db: float) -> Mismatch:
        """A matched pair beyond tolerance: drift when both kept the same candidate; when the
        target kept another candidate for the object, why it lacks the reference's one."""
        ref = self.sides["reference"].result
        tgt = self.sides["target"].result
        box, cls = int(ref.box_index[r]), int(ref.labels[r])
        moved = f"score {ref.scores[r]:.6g} → {tgt.scores[t]:.6g}, box moved up to {db:.3g} px"
        other = int(tgt.box_index[t])
        score = float(ref.scores[r])
        bad = None if box < 0 else self._nonfinite(box, cls)
        if not (np.isfinite(ds) and np.isfinite(db)) or bad:
            m = self._mismatch("both", cls, score, box,
                               Why("nonfinite", f"{moved}; {bad or 'non-finite values'}"))
        elif box < 0 or other < 0 or (other, int(tgt.labels[t])) == (box, cls) \
                or not self.aligned:
            m = self._mismatch("both", cls, score, box, Why("drift", moved))
        else:
            why = self.explain("reference", box, cls)
            m = self._mismatch("both", cls, score, box, why,
                               f"matched to another candidate (row {other}), {moved}; "
                               f"{why.detail}")
        m.target_box = other
        return m

    def mismatch(self, present: str, row: int) -> Mismatch:
        res = self.sides[present].result
        box, cls, score = int(res.box_index[row]), int(res.labels[row]), float(res.scores[row])
        if box < 0:
            return self._mismatch(present, cls, score, box, Why(
                "unexplained", "the pipeline does not say which candidate this is"))
        return self._mismatch(present, cls, score, box, self.explain(present, box, cls))


@dataclass
class DetectionDiff:
    """Counts and mismatches over all images of one target."""

    tol: Tolerances = field(default_factory=Tolerances)
    reference: int = 0
    target: int = 0
    matched: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    # detections whose fate an equal-scored candidate could have taken, per side
    ties_reference: int = 0
    ties_target: int = 0
    # matched pairs that only corner distance could match (zero-width / zero-height boxes)
    degenerate_matched: int = 0
    settings: Optional[tuple[Any, Any]] = None  # (reference, target) PipelineSettings

    def add_image(self, image: str, reference: Any, target: Any) -> list[Mismatch]:
        """reference, target: pipelines.Replayed of one image."""
        ref, tgt = reference.result, target.result
        if self.settings is None:
            self.settings = (reference.settings, target.settings)
        m = match(ref.boxes, ref.scores, ref.labels, tgt.boxes, tgt.labels,
                  iou=self.tol.match_iou, degenerate_px=self.tol.degenerate_px)
        ex = Explainer(image, reference, target, self.tol)
        if ex.aligned:  # what explaining each lonely detection asks of the other side
            ex.ask_ties("target", ref.box_index[m.lonely_ref], ref.labels[m.lonely_ref])
            ex.ask_ties("reference", tgt.box_index[m.lonely_tgt], tgt.labels[m.lonely_tgt])
        found = [ex.mismatch("reference", r) for r in m.lonely_ref]
        found += [ex.mismatch("target", t) for t in m.lonely_tgt]
        for (r, t), by_distance, dist in zip(m.pairs, m.by_distance, m.distance_px):
            ds = abs(float(ref.scores[r]) - float(tgt.scores[t]))
            db = float(np.max(np.abs(ref.boxes[r] - tgt.boxes[t])))
            self.degenerate_matched += int(by_distance)
            if not (ds <= self.tol.score and db <= self.tol.box_px):
                mm = ex.moved(r, t, ds, db)
                if by_distance:
                    mm.detail += (f"; degenerate box (width or height < "
                                  f"{self.tol.degenerate_px:g} px), matched by corner distance "
                                  f"{dist:.3g} px")
                found.append(mm)
        self.reference += len(ref)
        self.target += len(tgt)
        self.matched += len(m.pairs)
        self.ties_reference += int(tie_dependent(reference, ref.box_index, ref.labels).sum())
        self.ties_target += int(tie_dependent(target, tgt.box_index, tgt.labels).sum())
        self.mismatches += found
        return found

    def settings_differ(self) -> list[SettingDifference]:
        """Each NMS setting the two sides differ in, both values, and how many mismatches
        that difference decided."""
        if self.settings is None:
            return []
        ref, tgt = self.settings
        counts: dict[str, int] = {}
        for m in self.mismatches:
            if m.setting:
                counts[m.setting] = counts.get(m.setting, 0) + 1
        return [SettingDifference(setting=name, label=ref.COMPARED[name], reference=r,
                                  target=t, explains=counts.get(name, 0))
                for name, (r, t) in ref.differences(tgt).items()]

    def summary(self, class_names: Sequence[str] = (), examples: int = 12) -> DetectionSummary:
        causes = dict.fromkeys(CAUSES, 0)
        for m in self.mismatches:
            causes[m.cause] += 1
        total = self.reference + self.target
        # examples: the highest-scoring mismatches of each cause first
        by_cause: dict[str, list[Mismatch]] = {}
        for m in sorted(self.mismatches, key=lambda m: -m.score if np.isfinite(m.score)
                        else 0.0):
            by_cause.setdefault(m.cause, []).append(m)
        picked: list[Mismatch] = []
        while len(picked) < examples and any(by_cause.values()):
            for cause in CAUSES:
                if by_cause.get(cause) and len(picked) < examples:
                    picked.append(by_cause[cause].pop(0))
        name = (lambda c: class_names[c] if 0 <= c < len(class_names) else str(c))
        return DetectionSummary(
            reference=self.reference, target=self.target, matched=self.matched,
            # detections in both, over detections in either (F1-like: extras count too)
            match_rate=2 * self.matched / total if total else 1.0,
            mismatches=len(self.mismatches), unexplained=causes["unexplained"], causes=causes,
            ties={"reference": self.ties_reference, "target": self.ties_target},
            degenerate_matched=self.degenerate_matched,
            settings_differ=self.settings_differ(),
            settings_problem=self.settings[1].problem if self.settings else None,
            tolerances={"match_iou": self.tol.match_iou, "score": self.tol.score,
                        "box_px": self.tol.box_px, "iou_band": self.tol.iou_band,
                        "degenerate_px": self.tol.degenerate_px},
            examples=[MismatchExample(image=m.image, cause=m.cause, side=m.side,
                                      class_name=name(m.cls), score=m.score, box=m.box,
                                      rank=m.rank, limit=m.limit, setting=m.setting,
                                      detail=m.detail) for m in picked])
