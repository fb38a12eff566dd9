"""A two-stage detector's post-processing as a replayable pipeline (harness.align.pipelines):
its proposals linked to their RPN anchors and replayed in trace mode (harness.nms.rpn), its
box head's multiclass NMS replayed on its own RoIs (harness.nms.rcnn), and `unite`, which puts
both sides' second-stage candidates on the same rows — one row per proposal either side has,
matched by anchor — so the post-NMS diff (harness.align.detections) reads both sides' fates
of the same candidate, and a candidate whose proposal one side lacks has the fate
PROPOSAL_MISSING with the proposal diff's reason. Also the layer diff's two-stage pieces:
RoI-stage layers on matched rows (`same_rows`) and a split pair's RoI features
(`with_split_roi_features`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from harness.align.pipelines import Candidates, Pipeline, PipelineSettings, Replayed
from harness.align.proposals import ProposalReason, SideProposals, link_anchors
from harness.nms.trace import FateKind, NmsResult, Trace

# outputs whose size follows the proposal cap, which a deployed file may set otherwise
VARIABLE_OUTPUTS = ("proposals", "num_proposals", "roi_cls", "roi_reg")
# the module whose output is the RoI features (after RoIAlign), in PyTorch and in the file
ROI_FEATURES = "roi_head.bbox_roi_extractor"


def is_two_stage(model: Any) -> bool:
    """Whether a model source has proposals (harness.models.mmdet_twostage)."""
    return getattr(model, "rpn", None) is not None


class TwoStagePipeline(Pipeline):
    """The two-stage source's RPN (its `rpn` settings, or a file's) and box-head NMS (its
    `nms`, or a file's) on the stage outputs of one side."""

    per_class = True

    def __init__(self, model: Any, rpn: Any = None, nms: Any = None, name: str = "mmdet",
                 nms_pixels: str = "original"):
        self.model = model if nms is None else model.with_nms(
            score_thr=nms.score_thr, iou_threshold=nms.iou_threshold,
            max_per_img=nms.max_per_img)
        self.rpn = rpn or model.rpn
        self.name = name
        # where the box head's NMS measures IoU: "original" pixels (mmdet), or "input"
        # (a graph with the NMS inside)
        self.nms_pixels = nms_pixels
        n, r = self.model.nms, self.rpn
        self.settings = PipelineSettings(
            score_threshold=n.score_thr, score_inclusive=False,
            iou_threshold=n.iou_threshold, iou_inclusive=False, pre_topk=r.nms_pre,
            pre_topk_scope="level" if r.topk_scope == "level" else "image",
            max_detections=n.max_per_img, iou_formula="mmcv",
            proposal_nms_scope=r.scope, proposal_topk_scope=r.topk_scope,
            proposal_cap=r.max_per_img, proposal_iou_threshold=r.iou_threshold)

    def candidates(self, outputs, backend, inputs):
        props = np.asarray(outputs["proposals"], np.float32)
        return Candidates(boxes=props[..., :4], scores=props[..., 4:], stages=outputs)

    def replay(self, cands: Candidates, metas: Sequence[Any]) -> list[Replayed]:
        """Per image: the box head's NMS on this side's own RoIs, in trace mode, with the
        per-class boxes in original-image pixels (where mmdet's NMS measures IoU), and the
        side's proposals linked to their anchors."""
        from harness.nms.rcnn import rescale_to_original

        outputs = cands.stages
        decoded = self.model.decode(outputs, metas)
        results = self.model.detections(decoded, metas, trace=True,
                                        nms_pixels=self.nms_pixels)
        maps = self.model.rpn_maps(outputs)  # flattened once for both
        rpn = self.model.reference_proposals(outputs, metas, trace=True, settings=self.rpn,
                                             maps=maps)
        anchors = self.model.rpn_boxes(outputs, metas, maps)
        props = self.model.proposals(outputs, metas)
        out = []
        for i, (meta, res) in enumerate(zip(metas, results)):
            n = int(decoded.counts[i])
            boxes = rescale_to_original(decoded.boxes[i, :n], meta.scale_factor)
            p = props[i]
            linked = link_anchors(p[:, :4], p[:, 4], *anchors[i], prefer=rpn[i].box_index)
            side = Replayed(res, boxes, decoded.scores[i, :n], self.settings)
            side.proposals = SideProposals(p[:, :4], p[:, 4], linked, rpn[i], self.rpn)
            out.append(side)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": f"{self.name} two-stage", "rpn": dataclasses.asdict(self.rpn),
                "rcnn": dataclasses.asdict(self.model.nms), "nms_pixels": self.nms_pixels}


def proposal_replay_misses(side: Replayed) -> int:
    """Proposals of a side's output its RPN replay does not keep (0 unless ties or an
    unknown proposal layout separate them)."""
    kept = set(side.proposals.replay.box_index.tolist())
    return sum(int(a) not in kept for a in side.proposals.anchors)


def _remap_trace(trace: Trace, rows: np.ndarray, total: int) -> Trace:
    """`trace` (own rows) on `total` union rows: own row rows[u] at union row u (-1: the side
    lacks it: PROPOSAL_MISSING), suppressors renumbered."""
    out = Trace.empty(total, trace.num_classes, trace.pipeline)
    have = np.flatnonzero(rows >= 0)
    union_of = np.full(trace.num_boxes, -1, np.int64)
    union_of[rows[have]] = have
    for name in ("code", "rank", "limit", "by_box", "by_class", "iou", "threshold",
                 "inclusive", "score"):
        getattr(out, name)[have] = getattr(trace, name)[rows[have]]
    by = out.by_box[have]
    out.by_box[have] = np.where(by >= 0, union_of[np.maximum(by, 0)], -1)
    missing = np.flatnonzero(rows < 0)
    out.code[missing] = int(FateKind.PROPOSAL_MISSING)
    return out


def _on_rows(side: Replayed, rows: np.ndarray,
             reasons: dict[int, ProposalReason]) -> Replayed:
    """One side's Replayed on the union rows."""
    total = rows.size
    c = side.scores.shape[1]
    have = np.flatnonzero(rows >= 0)
    boxes = np.zeros((total, c, 4), np.float32)
    scores = np.zeros((total, c), np.float32)
    boxes[have] = side.boxes[rows[have]]
    scores[have] = side.scores[rows[have]]
    union_of = np.full(side.scores.shape[0], -1, np.int64)
    union_of[rows[have]] = have
    res = side.result
    result = NmsResult(res.boxes, res.scores, res.labels,
                       np.where(res.box_index >= 0, union_of[np.maximum(res.box_index, 0)], -1),
                       _remap_trace(res.trace, rows, total))
    pairs = None if side.output_pairs is None else {
        (int(union_of[b]) if b >= 0 else -1, c_) for b, c_ in side.output_pairs}
    out = Replayed(result, boxes, scores, side.settings, side.per_class, pairs)
    out.proposals = side.proposals
    out.missing_proposals = reasons
    return out


def unite(image: str, reference: Replayed, target: Replayed,
          diff: Any) -> tuple[Replayed, Replayed]:
    """Both sides on the same candidate rows: the proposal diff (harness.align.proposals.
    ProposalDiff) matches their proposals by anchor; a row one side lacks has the fate
    PROPOSAL_MISSING there, with the reason."""
    ref_rows, tgt_rows, reasons = diff.add_image(image, reference.proposals, target.proposals)
    return (_on_rows(reference, ref_rows, reasons["reference"]),
            _on_rows(target, tgt_rows, reasons["target"]))


def settings_from_file(model: Any, record: Optional[dict]) -> dict[str, Any]:
    """TwoStagePipeline's keyword arguments for a two-stage file: the proposal settings
    written into its graph (from its harness metadata; the model's own for a file without
    it) and the box head's NMS: for an end2end file the one in its graph (its recorded
    End2EndNms, IoUs on network-input pixels); for a raw one the model's, which the harness
    runs, as it runs a one-stage raw file's."""
    from harness.nms.rpn import RpnSettings

    record = record or {}
    rpn = RpnSettings(**record["rpn"]) if record.get("rpn") else model.rpn
    e2e = record.get("nms") if record.get("variant") == "end2end" else None
    if not e2e:
        return {"rpn": rpn}
    nms = dataclasses.replace(model.nms, score_thr=float(e2e["score_threshold"]),
                              iou_threshold=float(e2e["iou_threshold"]),
                              max_per_img=int(e2e["keep_topk"]))
    return {"rpn": rpn, "nms": nms, "nms_pixels": "input"}


def with_split_roi_features(found: Any, backend: Any) -> Any:
    """A split pair's RoI features are made between its graphs: compare them as the head
    graph's input, just before the head's first layer."""
    from harness.align.layers import Layer

    if ROI_FEATURES not in found.unmapped:
        return found
    head = backend.head.input_name
    first = next((i for i, lay in enumerate(found.layers)
                  if lay.module.startswith("roi_head.")), len(found.layers))
    layers = [*found.layers[:first], Layer(ROI_FEATURES, head, head, 0), *found.layers[first:]]
    found.layers = [Layer(lay.module, lay.tensor, lay.node, depth)
                    for depth, lay in enumerate(layers)]
    found.unmapped = [m for m in found.unmapped if m != ROI_FEATURES]
    found.counts["name"] = found.counts.get("name", 0) + 1
    found.counts["not mapped"] = len(found.unmapped)
    return found


def same_rows(module: str, ref: np.ndarray, tgt: np.ndarray,
              pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """A two-stage RoI-stage layer (B * K rows, one per proposal slot) on both sides, on
    the rows of the proposals both have, in the same order (pairs: per image the matched
    (reference rows, target rows)); other layers as they are."""
    if not module.startswith("roi_head."):
        return ref, tgt
    b = len(pairs)
    r = ref.reshape(b, -1, *ref.shape[1:])
    t = tgt.reshape(b, -1, *tgt.shape[1:])
    return (np.concatenate([r[i, p[0]] for i, p in enumerate(pairs)]),
            np.concatenate([t[i, p[1]] for i, p in enumerate(pairs)]))
