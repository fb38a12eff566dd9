"""The proposal diff of a two-stage detector: each side's proposals (its `proposals` output)
linked to the RPN anchor that made them, matched across the sides by that anchor, and for
every proposal one side lacks, why — read from the absent side's RPN replay in trace mode
(harness.nms.rpn), the way harness.align.detections explains final detections:

- topk_cut: the absent side's pre-NMS TopK (nms_pre, per level or over all levels) cut its
  anchor, and the two sides' TopK settings differ;
- nms_scope: the absent side's proposal NMS suppressed it with an anchor of another FPN level
  (one NMS over all levels against mmdet's one per level);
- cap: cut by the proposal cap (max_per_img) after NMS;
- tie_order: decided by equal objectness (a cut inside a run of equal scores, a suppressor
  with the same score, or the file's own sort where its replay keeps it);
- iou_edge: suppressed at an IoU within the band of the NMS threshold;
- drift: the numbers moved (its objectness ranks past the same nms_pre, its box was squashed
  by the size filter, or moved into a suppression);
- unexplained: no anchor decodes to the proposal, or the fates do not decide.

Anchors are the same on both sides (same input size, same prior generator), so the anchor
index is a proposal's identity across sides, whatever order or count each side keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from harness.nms.trace import FateKind

PROPOSAL_CAUSES = ("topk_cut", "nms_scope", "cap", "tie_order", "iou_edge", "drift",
                   "unexplained")
# a proposal and a decoded anchor box are the same box within this many pixels
LINK_PX = 0.05
# a proposal is the same on both sides (any difference later is born after the RPN)
SAME_PROPOSAL_PX = 1e-3
MAX_DEPTH = 4
# a proposal suppressed this close to the NMS's IoU threshold is an IoU edge
IOU_BAND = 0.02


@dataclass
class SideProposals:
    """One image's proposals on one side. boxes (K, 4) xyxy input pixels and scores (K,) as
    the side output them; anchors (K,) the anchor each came from (-1: none decodes to it);
    replay: the side's RPN replayed in trace mode (harness.nms.rpn.RpnResult, a fate per
    anchor); settings: the RpnSettings it was replayed with."""

    boxes: np.ndarray
    scores: np.ndarray
    anchors: np.ndarray
    replay: Any
    settings: Any

    def row_of(self) -> dict[int, int]:
        return {int(a): i for i, a in enumerate(self.anchors) if a >= 0}

    def level(self, anchor: int) -> int:
        return int(self.replay.anchor_level[anchor])


def link_anchors(boxes: np.ndarray, scores: np.ndarray, decoded: np.ndarray,
                 objectness: np.ndarray, prefer: Sequence[int] = ()) -> np.ndarray:
    """For each proposal (boxes (K, 4), scores (K,)), the anchor whose decoded box (decoded
    (N, 4), clipped as the RPN clips) is within LINK_PX of it, the closest objectness first,
    then an anchor in `prefer` (the replay's kept ones), then the lower index; -1 where none
    is. Anchors are not reused."""
    out = np.full(len(boxes), -1, np.int64)
    if not len(boxes) or not len(decoded):
        return out
    order = np.argsort(decoded[:, 0], kind="stable")
    x1 = decoded[order, 0]
    lo = np.searchsorted(x1, boxes[:, 0] - LINK_PX, "left")
    hi = np.searchsorted(x1, boxes[:, 0] + LINK_PX, "right")
    preferred = np.zeros(len(decoded), bool)
    preferred[np.asarray(prefer, np.int64)] = True
    taken = np.zeros(len(decoded), bool)
    for i in range(len(boxes)):
        cand = order[lo[i]:hi[i]]
        if not cand.size:
            continue
        near = np.max(np.abs(decoded[cand] - boxes[i]), axis=1) <= LINK_PX
        cand = cand[near & ~taken[cand]]
        if not cand.size:
            continue
        ds = np.abs(objectness[cand] - scores[i])
        best = cand[np.lexsort((cand, ~preferred[cand], ds))[0]]
        out[i] = best
        taken[best] = True
    return out


@dataclass
class ProposalReason:
    """Why one side lacks a proposal the other has: a PROPOSAL_CAUSES cause, a sentence, and
    the RPN setting (a PipelineSettings field) whose difference decided it, if one did."""

    cause: str
    detail: str
    setting: Optional[str] = None


def _tied_at_cut(side: SideProposals, anchor: int, kinds: Sequence[FateKind]) -> bool:
    """Whether anchor's objectness equals that of an anchor of the same group that made it
    past the cut (`kinds`: the fates past it)."""
    tr = side.replay.trace
    past = np.isin(tr.code[:, 0], [int(k) for k in kinds])
    if side.settings.topk_scope == "level":
        past &= side.replay.anchor_level == side.replay.anchor_level[anchor]
    score = tr.score[anchor, 0]
    return bool(np.any(tr.score[past, 0] == score))


def why_missing(anchor: int, present: SideProposals, absent: SideProposals,
                names: tuple[str, str], depth: int = 0) -> ProposalReason:
    """Why `absent` (names: (present's name, absent's name)) has no proposal from `anchor`,
    which `present` has."""
    me, other = names
    if anchor < 0:
        return ProposalReason("unexplained", f"no anchor of {me}'s RPN decodes to it")
    if depth > MAX_DEPTH:
        return ProposalReason("unexplained", "suppression chain too long to follow")
    fate = absent.replay.trace.fate(anchor, 0)
    level = absent.level(anchor)
    where = f"{other}'s RPN, level {level}: {fate}"
    s_a, s_p = absent.settings, present.settings
    if fate.kind == FateKind.KEPT:
        if _tied_at_cut(absent, anchor, (FateKind.KEPT,)) or \
                np.any(absent.scores == np.float32(fate.score)):
            return ProposalReason("tie_order", f"{other}'s replay keeps it but its own sort of "
                                               "equal objectness does not")
        return ProposalReason("unexplained", f"{other}'s replay keeps it, its output does not")
    if fate.kind == FateKind.CUT_PRE_NMS_TOPK:
        if _tied_at_cut(absent, anchor, (FateKind.KEPT, FateKind.SUPPRESSED,
                                         FateKind.CUT_MAX_DETECTIONS,
                                         FateKind.BELOW_MIN_BBOX_SIZE)):
            return ProposalReason("tie_order", f"{where}, tied with the last anchor kept")
        if (s_a.nms_pre, s_a.topk_scope) != (s_p.nms_pre, s_p.topk_scope):
            return ProposalReason(
                "topk_cut", f"{where} (nms_pre {s_a.nms_pre} per "
                            f"{'level' if s_a.topk_scope == 'level' else 'image'} vs "
                            f"{s_p.nms_pre} per "
                            f"{'level' if s_p.topk_scope == 'level' else 'image'})",
                "pre_topk" if s_a.nms_pre != s_p.nms_pre else "proposal_topk_scope")
        return ProposalReason("drift", f"{where}: its objectness moved past the same nms_pre")
    if fate.kind == FateKind.BELOW_MIN_BBOX_SIZE:
        return ProposalReason("drift", f"{where}: its box moved below the size filter")
    if fate.kind == FateKind.CUT_MAX_DETECTIONS:
        if s_a.max_per_img != s_p.max_per_img:
            return ProposalReason("cap", f"{where} (max_per_img {s_a.max_per_img} vs "
                                         f"{s_p.max_per_img})", "proposal_cap")
        if _tied_at_cut(absent, anchor, (FateKind.KEPT,)):
            return ProposalReason("tie_order", f"{where}, tied with the last proposal kept")
        return ProposalReason("cap", f"{where}: more proposals survived ahead of it there")
    if fate.kind == FateKind.SUPPRESSED:
        by = int(fate.by_box)
        if s_a.scope != s_p.scope and absent.level(by) != level:
            return ProposalReason(
                "nms_scope", f"{where}, an anchor of level {absent.level(by)}: {other} runs "
                             f"one NMS over {'all levels' if s_a.scope == 'all' else 'each level'}"
                             f", {me} over {'all levels' if s_p.scope == 'all' else 'each level'}",
                "proposal_nms_scope")
        tr = absent.replay.trace
        if tr.score[by, 0] == tr.score[anchor, 0]:
            return ProposalReason("tie_order", f"{where}; both objectness {fate.score:.6g}")
        if by not in present.row_of():
            # the suppressor is missing on the present side: that is the reason
            inner = why_missing(by, absent, present, (other, me), depth + 1)
            return ProposalReason(inner.cause, f"{where}, an anchor {me} lacks because "
                                               f"{inner.detail}", inner.setting)
        if s_a.iou_threshold != s_p.iou_threshold:
            return ProposalReason("drift", f"{where} (IoU threshold {s_a.iou_threshold:g} vs "
                                           f"{s_p.iou_threshold:g})", "proposal_iou_threshold")
        if abs(float(fate.iou) - float(fate.threshold)) <= IOU_BAND:
            return ProposalReason("iou_edge", where)
        return ProposalReason("drift", f"{where}: the boxes moved into a suppression")
    return ProposalReason("unexplained", where)


@dataclass
class ProposalDiff:
    """Proposals of one target against the reference's, over all images."""

    reference: int = 0
    target: int = 0
    matched: int = 0
    identical: int = 0
    unlinked: int = 0
    box_max_abs: float = 0.0
    score_max_abs: float = 0.0
    missing: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "target": dict.fromkeys(PROPOSAL_CAUSES, 0),
        "reference": dict.fromkeys(PROPOSAL_CAUSES, 0)})
    examples: list[dict[str, Any]] = field(default_factory=list)
    images_identical: int = 0
    images: int = 0
    # the last image: whether its proposals were all the same on both sides, the union rows
    # whose proposal is the same on both, and the (reference rows, target rows) matched
    last_identical: bool = False
    last_same_rows: set = field(default_factory=set)
    last_pairs: tuple = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def add_image(self, image: str, ref: SideProposals, tgt: SideProposals
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, dict[int, ProposalReason]]]:
        """Match one image's proposals by anchor. Returns (ref_rows, tgt_rows): for every
        union row (the reference's rows first, then the target's own), the row of each side
        (-1 where that side lacks it), and per side ("reference", "target") the reason it
        lacks each union row it lacks."""
        tgt_of = tgt.row_of()
        ref_rows = list(range(len(ref.anchors)))
        tgt_rows = [tgt_of.get(int(a), -1) if a >= 0 else -1 for a in ref.anchors]
        linked = set(tgt_rows)
        extra = [j for j in range(len(tgt.anchors)) if j not in linked]
        ref_rows += [-1] * len(extra)
        tgt_rows += extra
        ref_rows_a, tgt_rows_a = np.asarray(ref_rows, np.int64), np.asarray(tgt_rows, np.int64)
        reasons: dict[str, dict[int, ProposalReason]] = {"reference": {}, "target": {}}
        both = (ref_rows_a >= 0) & (tgt_rows_a >= 0)
        r, t = ref_rows_a[both], tgt_rows_a[both]
        same = 0
        self.last_same_rows = set()
        if r.size:
            db = np.max(np.abs(ref.boxes[r] - tgt.boxes[t]), axis=1)
            ds = np.abs(ref.scores[r] - tgt.scores[t])
            self.box_max_abs = max(self.box_max_abs, float(db.max()))
            self.score_max_abs = max(self.score_max_abs, float(ds.max()))
            same = int(np.count_nonzero(db <= SAME_PROPOSAL_PX))
            self.last_same_rows = set(np.flatnonzero(both)[db <= SAME_PROPOSAL_PX].tolist())
        self.last_pairs = (r, t)
        for u in np.flatnonzero(~both):
            if tgt_rows_a[u] < 0:  # the reference has it, the target does not
                a, absent, names = int(ref.anchors[ref_rows_a[u]]), "target", \
                    ("reference", "target")
                why = why_missing(a, ref, tgt, names)
            else:
                a, absent, names = int(tgt.anchors[tgt_rows_a[u]]), "reference", \
                    ("target", "reference")
                why = why_missing(a, tgt, ref, names)
            reasons[absent][int(u)] = why
            self.missing[absent][why.cause] += 1
            if len(self.examples) < 12:
                self.examples.append({"image": image, "missing_on": absent, "anchor": a,
                                      "cause": why.cause, "detail": why.detail})
        self.unlinked += int(np.count_nonzero(ref.anchors < 0) + np.count_nonzero(tgt.anchors < 0))
        self.reference += len(ref.anchors)
        self.target += len(tgt.anchors)
        self.matched += int(both.sum())
        self.identical += same
        self.images += 1
        self.last_identical = same == len(ref.anchors) == len(tgt.anchors)
        self.images_identical += int(self.last_identical)
        return ref_rows_a, tgt_rows_a, reasons

    def summary(self) -> dict[str, Any]:
        unexplained = self.missing["target"]["unexplained"] + \
            self.missing["reference"]["unexplained"]
        return {"reference": self.reference, "target": self.target, "matched": self.matched,
                "identical": self.identical, "images": self.images,
                "images_identical": self.images_identical,
                "box_max_abs": self.box_max_abs, "score_max_abs": self.score_max_abs,
                "missing_on_target": {k: v for k, v in self.missing["target"].items() if v},
                "missing_on_reference": {k: v for k, v in self.missing["reference"].items()
                                         if v},
                "unlinked": self.unlinked, "unexplained": unexplained,
                "examples": self.examples}
