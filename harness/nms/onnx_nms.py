"""ONNX NonMaxSuppression as onnxruntime's CPU kernel runs it, and as TensorRT's INMSLayer runs it
after onnx-tensorrt imports the op (docs/nms-semantics.md "ONNX NonMaxSuppression"): batched
inputs, the op's selected_indices, and a trace per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from harness.nms.greedy import TieOrder, check_tie_order, descending_order, greedy_suppress
from harness.nms.trace import FateKind, NmsResult, Trace

Flavour = Literal["onnxruntime", "tensorrt"]
# INMSLayer's TopKBoxLimit: default and maximum 5000 (2000 on SM 5.3 / 6.2); onnx-tensorrt never
# sets it, so an imported ONNX NonMaxSuppression always runs with the default.
TRT_TOPK_BOX_LIMIT = 5000
_INT32_MAX = 2**31 - 1


@dataclass
class OnnxNmsOutput:
    """selected_indices: (K, 3) int64 rows (batch, class, box) in the op's output order.
    results: one NmsResult per image, rows in the same order (boxes as corners: the input rows
    for center_point_box 0, [xc - w/2, yc - h/2, xc + w/2, yc + h/2] for 1)."""

    selected_indices: np.ndarray
    results: list[NmsResult]

    @property
    def traces(self) -> list[Optional[Trace]]:
        return [r.trace for r in self.results]


def onnx_non_max_suppression(
    boxes: np.ndarray,
    scores: np.ndarray,
    max_output_boxes_per_class: int = 0,
    iou_threshold: float = 0.0,
    score_threshold: Optional[float] = None,
    *,
    center_point_box: int = 0,
    flavour: Flavour = "onnxruntime",
    topk_box_limit: int = TRT_TOPK_BOX_LIMIT,
    tie_order: TieOrder = "stable",
    trace: bool = False,
) -> OnnxNmsOutput:
    """ONNX NonMaxSuppression.

    boxes: (B, N, 4) float32; center_point_box 0: two opposite corners in either order
    (nominally [y1, x1, y2, x2]); 1: [x_center, y_center, width, height].
    scores: (B, C, N) float32. max_output_boxes_per_class, iou_threshold, score_threshold: the
    op's optional inputs with their defaults (0: nothing selected; 0.0; None: absent).

    flavour "onnxruntime" (onnxruntime CPU kernel, onnx reference): per (image, class) keep
    score > threshold, visit by descending score (ties: lower box first), suppress IoU >
    threshold, stop at max_output_boxes_per_class; rows grouped by batch then class.
    flavour "tensorrt" (INMSLayer, onnx-tensorrt >= 8.5): an absent score_threshold becomes the
    layer's default 0.0 (so scores <= 0 are dropped); per image only the best `topk_box_limit`
    (box, class) candidates go on (SPEC); rows ordered by batch then descending score. Its IoU
    arithmetic, and whether the limit counts (box, class) pairs, are not published: modelled as
    onnxruntime's arithmetic over pairs (unverified). TensorRT leaves tie order unspecified.
    tie_order: "stable" is onnxruntime's order (score, then lower box index; for "tensorrt",
    lower box * C + class).
    """
    check_tie_order(tie_order)
    if flavour not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"flavour must be 'onnxruntime' or 'tensorrt', got {flavour!r}")
    if center_point_box not in (0, 1):
        raise ValueError(f"center_point_box must be 0 or 1, got {center_point_box}")
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.ndim != 3 \
            or scores.shape[0] != boxes.shape[0] or scores.shape[2] != boxes.shape[1]:
        raise ValueError(f"need boxes (B, N, 4) and scores (B, C, N); got {boxes.shape}, "
                         f"{scores.shape}")
    iou_thr = np.float32(iou_threshold)
    if flavour == "onnxruntime":
        if not 0 <= iou_thr <= 1:  # GetThresholdsFromInputs rejects it
            raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
        max_out = max(int(max_output_boxes_per_class), 0)
    else:
        # onnx-tensorrt: min(value, INT32_MAX), cast to int32
        max_out = max(min(int(max_output_boxes_per_class), _INT32_MAX), 0)
        if score_threshold is None:
            score_threshold = 0.0
    score_thr = None if score_threshold is None else np.float32(score_threshold)

    rows, results = [], []
    for b in range(boxes.shape[0]):
        run = _image_onnxruntime if flavour == "onnxruntime" else _image_tensorrt
        sel, result = run(boxes[b], scores[b], max_out, iou_thr, score_thr,
                          center_point_box, topk_box_limit, tie_order, trace)
        rows.append(np.column_stack([np.full(len(sel), b), sel[:, 0], sel[:, 1]]))
        results.append(result)
    selected = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)
    return OnnxNmsOutput(selected_indices=selected.reshape(-1, 3), results=results)


def _box_info(boxes: np.ndarray, center_point_box: int) -> tuple[np.ndarray, ...]:
    """(ymin, xmin, ymax, xmax, area) per box as onnxruntime's BoxInfo stores them (float32)."""
    if center_point_box == 0:
        def min_max(a, b):  # MaxMin(lhs, rhs): lhs >= rhs ? (rhs, lhs) : (lhs, rhs)
            ge = a >= b
            return np.where(ge, b, a), np.where(ge, a, b)
        ymin, ymax = min_max(boxes[:, 0], boxes[:, 2])
        xmin, xmax = min_max(boxes[:, 1], boxes[:, 3])
        area = (ymax - ymin) * (xmax - xmin)
    else:
        half_w = boxes[:, 2] / np.float32(2)
        half_h = boxes[:, 3] / np.float32(2)
        area = boxes[:, 2] * boxes[:, 3]  # from w and h as given, not from the corners
        xmin, xmax = boxes[:, 0] - half_w, boxes[:, 0] + half_w
        ymin, ymax = boxes[:, 1] - half_h, boxes[:, 1] + half_h
    return ymin, xmin, ymax, xmax, area


def _corners(boxes: np.ndarray, center_point_box: int) -> np.ndarray:
    """Output boxes: the input rows (cpb 0) or centre-size turned into x1, y1, x2, y2 (cpb 1)."""
    if center_point_box == 0:
        return boxes.copy()
    ymin, xmin, ymax, xmax, _ = _box_info(boxes, 1)
    return np.stack([xmin, ymin, xmax, ymax], axis=1)


def _ort_iou(info: tuple[np.ndarray, ...]):
    """BoxInfo::SuppressByIOU's arithmetic; 0 where it returns false before dividing."""
    ymin, xmin, ymax, xmax, area = info
    zero = np.float32(0)

    def iou(i: np.ndarray, js: np.ndarray) -> np.ndarray:
        # candidate = js ("this"), selected = i ("rhs"); std::max / std::min
        ix_min = np.where(xmin[js] < xmin[i], xmin[i], xmin[js])
        ix_max = np.where(xmax[i] < xmax[js], xmax[i], xmax[js])
        iy_min = np.where(ymin[js] < ymin[i], ymin[i], ymin[js])
        iy_max = np.where(ymax[i] < ymax[js], ymax[i], ymax[js])
        inter = (ix_max - ix_min) * (iy_max - iy_min)
        # the early `return false`s, written as their C++ comparisons (nan compares false)
        ok = ~(ix_max <= ix_min) & ~(iy_max <= iy_min) & ~(inter <= zero)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            value = inter / (area[js] + area[i] - inter)
        return np.where(ok, value, zero).astype(np.float32)

    return iou


def _image_onnxruntime(boxes, scores, max_out, iou_thr, score_thr, cpb, topk, tie_order,
                       trace):
    del topk  # onnxruntime has no pre-NMS cap
    n = boxes.shape[0]
    c = scores.shape[0]
    tr = Trace.empty(n, c, "onnx_nms/onnxruntime") if trace else None
    iou_fn = _ort_iou(_box_info(boxes, cpb))
    selected = []
    for cls in range(c):
        s = scores[cls]
        if score_thr is None:
            cand = np.arange(n)
        else:
            passed = s > score_thr
            cand = np.flatnonzero(passed)
            if tr is not None:
                bad = np.flatnonzero(~passed)
                tr.record(bad, cls, FateKind.BELOW_SCORE_THRESHOLD, score=s[bad],
                          threshold=score_thr, inclusive=False)
        order = cand[descending_order(s[cand], tie_order)]
        sup = greedy_suppress(order, n, iou_fn, iou_thr, inclusive=False)
        kept = sup.kept[:max_out]
        selected.append(np.column_stack([np.full(kept.size, cls), kept]))
        if tr is not None:
            gone = np.flatnonzero(sup.by >= 0)
            tr.record(gone, cls, FateKind.SUPPRESSED, by_box=sup.by[gone], by_class=cls,
                      iou=sup.iou[gone], threshold=iou_thr, inclusive=False, score=s[gone])
            late = sup.kept[kept.size:]
            tr.record(late, cls, FateKind.CUT_MAX_DETECTIONS,
                      rank=np.arange(kept.size, sup.kept.size), limit=max_out, score=s[late])
    sel = np.concatenate(selected) if selected else np.zeros((0, 2), np.int64)
    return sel, _result(boxes, scores, sel, cpb, tr)


def _image_tensorrt(boxes, scores, max_out, iou_thr, score_thr, cpb, topk, tie_order, trace):
    n = boxes.shape[0]
    c = scores.shape[0]
    tr = Trace.empty(n, c, "onnx_nms/tensorrt") if trace else None
    # the layer sees scores transposed to [N, C]: candidate id = box * C + class
    flat = np.ascontiguousarray(scores.T).ravel()
    passed = flat > score_thr
    if tr is not None:
        bad = np.flatnonzero(~passed)
        tr.record(bad // c, bad % c, FateKind.BELOW_SCORE_THRESHOLD, score=flat[bad],
                  threshold=score_thr, inclusive=False)
    cand = np.flatnonzero(passed)
    cand = cand[descending_order(flat[cand], tie_order)]
    if tr is not None and cand.size > topk:
        cut = cand[topk:]
        tr.record(cut // c, cut % c, FateKind.CUT_PRE_NMS_TOPK,
                  rank=np.arange(topk, cand.size), limit=topk, score=flat[cut])
    cand = cand[:topk]
    # per-class NMS over the capped candidates, visited in the capped (score) order
    box_of = cand // c
    cls_of = cand % c
    pos_iou = _ort_iou(_box_info(boxes[box_of], cpb))
    sup = greedy_suppress(np.arange(cand.size), cand.size, pos_iou, iou_thr, inclusive=False,
                          groups=cls_of)
    kept_pos = np.zeros(cand.size, bool)
    per_class_rank = np.full(cand.size, -1, np.int64)
    for cls in np.unique(cls_of[sup.kept]):
        in_cls = sup.kept[cls_of[sup.kept] == cls]  # survivors of this class, score order
        per_class_rank[in_cls] = np.arange(in_cls.size)
        kept_pos[in_cls[:max_out]] = True
    out_pos = np.flatnonzero(kept_pos)  # candidate order is already descending score
    sel = np.column_stack([cls_of[out_pos], box_of[out_pos]])
    if tr is not None:
        gone = np.flatnonzero(sup.by >= 0)
        tr.record(box_of[gone], cls_of[gone], FateKind.SUPPRESSED, by_box=box_of[sup.by[gone]],
                  by_class=cls_of[gone], iou=sup.iou[gone], threshold=iou_thr,
                  inclusive=False, score=flat[cand[gone]])
        late = sup.kept[~kept_pos[sup.kept]]
        tr.record(box_of[late], cls_of[late], FateKind.CUT_MAX_DETECTIONS,
                  rank=per_class_rank[late], limit=max_out, score=flat[cand[late]])
    return sel, _result(boxes, scores, sel, cpb, tr)


def _result(boxes: np.ndarray, scores: np.ndarray, sel: np.ndarray, cpb: int,
            tr: Optional[Trace]) -> NmsResult:
    """NmsResult of one image from its (class, box) rows; kept ranks are the row order."""
    cls = sel[:, 0].astype(np.int64)
    box = sel[:, 1].astype(np.int64)
    if tr is not None:
        tr.record(box, cls, FateKind.KEPT, rank=np.arange(box.size), score=scores[cls, box])
        tr.check_complete()
    return NmsResult(boxes=_corners(boxes, cpb)[box], scores=scores[cls, box].copy(),
                     labels=cls, box_index=box, trace=tr)
