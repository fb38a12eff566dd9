"""TensorRT's BatchedNMS_TRT / BatchedNMSDynamic_TRT plugins (plugin/batchedNMSPlugin and the
common kernels sortScoresPerClass, allClassNMS, sortScoresPerImage, gatherNMSOutputs), in fp32:
per-class topK, strict (>) tests, Caffe's +1 px, keepTopK across classes
(docs/nms-semantics.md "TensorRT BatchedNMS_TRT / BatchedNMSDynamic_TRT").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from harness.nms.greedy import (
    Suppression, TieOrder, check_tie_order, descending_order, greedy_suppress,
)
from harness.nms.trace import FateKind, NmsResult, Trace

# batchedNMSPlugin.cpp: topK above 512 * 8 is rejected
BATCHED_NMS_MAX_TOPK = 4096


@dataclass
class BatchedNmsOutput:
    """The plugin's outputs: num_detections (B, 1) int32; nmsed_boxes (B, keepTopK, 4),
    nmsed_scores (B, keepTopK), nmsed_classes (B, keepTopK), all float32 (classes too).
    Invalid rows: class -1, score 0, box 0 (they can sit between valid rows; see
    batched_nms_trt). nmsed_indices (B, keepTopK) int64: input box row or -1 (not a plugin
    output). results: one NmsResult per image with the valid rows in output order.
    """

    num_detections: np.ndarray
    nmsed_boxes: np.ndarray
    nmsed_scores: np.ndarray
    nmsed_classes: np.ndarray
    nmsed_indices: np.ndarray
    results: list[NmsResult]

    @property
    def traces(self) -> list[Optional[Trace]]:
        return [r.trace for r in self.results]


def batched_nms_trt(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    top_k: int,
    keep_top_k: int,
    score_threshold: float,
    iou_threshold: float,
    share_location: bool = True,
    background_label_id: int = -1,
    is_normalized: bool = True,
    clip_boxes: bool = True,
    caffe_semantics: bool = True,
    score_bits: int = 16,
    tie_order: TieOrder = "stable",
    trace: bool = False,
    max_top_k: int = BATCHED_NMS_MAX_TOPK,
) -> BatchedNmsOutput:
    """BatchedNMS_TRT / BatchedNMSDynamic_TRT on fp32 inputs (attributes: topK, keepTopK,
    scoreThreshold, iouThreshold, shareLocation, backgroundLabelId, isNormalized, clipBoxes,
    scoreBits, caffeSemantics; numClasses is scores.shape[2]; defaults are the plugin's).

    boxes: (B, N, 4) or (B, N, 1, 4) with share_location, (B, N, C, 4) without; two opposite
    corners in either order. scores: (B, N, C).
    Per class: keep score > score_threshold (failing slots become score 0, index -1), sort
    descending, greedy NMS over the first top_k slots suppressing IoU > iou_threshold. IoU
    without +1 when is_normalized; when not, box areas are (w + 1)(h + 1) and, with
    caffe_semantics, the intersection sides get +1 too (so boxes that merely touch, or do not
    meet at all, overlap by at least 1 px^2). Per image: all classes' top_k slots sorted by
    score, the first keep_top_k gathered; slots of index -1 become rows of class -1, score 0.
    keep_top_k > top_k: the gather kernel returns at once, num_detections stays 0 and the
    other outputs keep whatever the buffers held (returned here as invalid rows).
    clip_boxes clamps output boxes to [0, 1] whatever is_normalized says (gatherNMSOutputs.cu;
    the README says only when normalized). tie_order "stable": lower box index first within a
    class, lower class first across classes (cub radix sorts are stable, so this is the
    plugin's order); "reverse": the opposite, as a what-if. max_top_k: the plugin's topK
    limit (4096; mmdeploy's TRTBatchedNMS, a copy of this plugin, allows 5120). score_bits only changes fp16
    engines and is ignored.
    """
    check_tie_order(tie_order)
    if top_k > max_top_k:
        raise ValueError(f"topK {top_k} exceeds the plugin's limit {max_top_k}")
    if top_k <= 0 or keep_top_k <= 0:
        raise ValueError(f"topK and keepTopK must be > 0, got {top_k}, {keep_top_k}")
    del score_bits  # fp16 only
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (B, N, C), got {scores.shape}")
    bsz, n, c = scores.shape
    if share_location:
        if boxes.shape not in ((bsz, n, 4), (bsz, n, 1, 4)):
            raise ValueError(f"shareLocation boxes must be (B, N, 4) or (B, N, 1, 4), got "
                             f"{boxes.shape}")
        boxes = boxes.reshape(bsz, n, 4)
    elif boxes.shape != (bsz, n, c, 4):
        raise ValueError(f"boxes must be (B, N, C, 4) without shareLocation, got {boxes.shape}")

    num = np.zeros((bsz, 1), np.int32)
    out_boxes = np.zeros((bsz, keep_top_k, 4), np.float32)
    out_scores = np.zeros((bsz, keep_top_k), np.float32)
    out_classes = np.full((bsz, keep_top_k), -1, np.float32)
    out_index = np.full((bsz, keep_top_k), -1, np.int64)
    results = []
    for b in range(bsz):
        rows, r = _image(boxes[b], scores[b], top_k, keep_top_k, np.float32(score_threshold),
                         np.float32(iou_threshold), background_label_id, is_normalized,
                         clip_boxes, caffe_semantics, tie_order, trace)
        slot_cls, slot_box, slot_score, slot_xyxy = rows
        valid = slot_box >= 0
        num[b, 0] = np.count_nonzero(valid)
        out_classes[b, valid] = slot_cls[valid]
        out_scores[b, valid] = slot_score[valid]
        out_boxes[b, valid] = slot_xyxy[valid]
        out_index[b, valid] = slot_box[valid]
        results.append(r)
    return BatchedNmsOutput(num, out_boxes, out_scores, out_classes, out_index, results)


def _caffe_iou(boxes: np.ndarray, normalized: bool, caffe: bool):
    """jaccardOverlap() of allClassNMS.cu, fp32; boxes (M, 4), corners in either order."""
    # getDiagonalMinMaxSortedBox (CUDA fminf/fmaxf); which axis is x does not matter
    ax0, ax1 = np.fmin(boxes[:, 0], boxes[:, 2]), np.fmax(boxes[:, 0], boxes[:, 2])
    ay0, ay1 = np.fmin(boxes[:, 1], boxes[:, 3]), np.fmax(boxes[:, 1], boxes[:, 3])
    one, zero = np.float32(1), np.float32(0)

    def size(x0, y0, x1, y1):
        w, h = x1 - x0, y1 - y0
        s = w * h if normalized else (w + one) * (h + one)
        return np.where((x1 < x0) | (y1 < y0), zero, s)

    sizes = size(ax0, ay0, ax1, ay1)

    def iou(i: np.ndarray, js: np.ndarray) -> np.ndarray:
        # intersectBbox(bbox1 = kept i, bbox2 = candidate js): all-zero box when apart
        apart = (ax0[js] > ax1[i]) | (ax1[js] < ax0[i]) | (ay0[js] > ay1[i]) | (ay1[js] < ay0[i])
        ix0 = np.where(apart, zero, np.fmax(ax0[i], ax0[js]))
        iy0 = np.where(apart, zero, np.fmax(ay0[i], ay0[js]))
        ix1 = np.where(apart, zero, np.fmin(ax1[i], ax1[js]))
        iy1 = np.where(apart, zero, np.fmin(ay1[i], ay1[js]))
        iw, ih = ix1 - ix0, iy1 - iy0
        if not normalized and caffe:
            iw, ih = iw + one, ih + one
        inter = iw * ih
        with np.errstate(divide="ignore", invalid="ignore"):
            value = inter / (sizes[i] + sizes[js] - inter)
        return np.where((iw > zero) & (ih > zero), value, zero).astype(np.float32)

    return iou


def _image(boxes, scores, top_k, keep_top_k, thr, iou_thr, background, normalized, clip,
           caffe, tie_order, trace):
    n, c = scores.shape
    tr = Trace.empty(n, c, "batched_nms") if trace else None
    # after NMS: per class top_k slots (score, box index or -1), class-major, as allClassNMS
    # writes them
    slot_score = np.zeros((c, top_k), np.float32)
    slot_box = np.full((c, top_k), -1, np.int64)
    read = min(top_k, n)
    for cls in range(c):
        if cls == background:  # prepareSortData clears the whole class
            if tr is not None:
                tr.record(np.arange(n), cls, FateKind.BACKGROUND_CLASS)
            continue
        s = scores[:, cls]
        passed = s > thr
        keys = np.where(passed, s, np.float32(0))
        order = descending_order(keys, tie_order)
        idx = np.where(passed[order], order, -1)  # sorted slots: box index or -1
        if tr is not None:
            bad = np.flatnonzero(~passed)
            tr.record(bad, cls, FateKind.BELOW_SCORE_THRESHOLD, score=s[bad], threshold=thr,
                      inclusive=False)
            late = np.flatnonzero(idx[read:] >= 0) + read
            tr.record(idx[late], cls, FateKind.CUT_PRE_NMS_TOPK, rank=late, limit=top_k,
                      score=s[idx[late]])
        slots = idx[:read]
        valid_slots = np.flatnonzero(slots >= 0)
        cls_boxes = boxes[:, cls] if boxes.ndim == 3 else boxes
        if read and slots[0] < 0:
            # allClassNMS_kernel's loop starts at slot 0 and stops at once if it is empty:
            # every later valid slot is then kept unchecked (only when scores <= 0 pass)
            sup = Suppression(kept=valid_slots, by=np.full(read, -1, np.int64),
                              iou=np.full(read, np.nan, np.float32))
        else:
            sup = greedy_suppress(valid_slots, read, _caffe_iou(cls_boxes[np.maximum(slots, 0)],
                                                                normalized, caffe),
                                  iou_thr, inclusive=False)
        slot_box[cls, sup.kept] = slots[sup.kept]
        slot_score[cls, sup.kept] = keys[slots[sup.kept]]
        if tr is not None:
            gone = np.flatnonzero(sup.by >= 0)
            tr.record(slots[gone], cls, FateKind.SUPPRESSED, by_box=slots[sup.by[gone]],
                      by_class=cls, iou=sup.iou[gone], threshold=iou_thr, inclusive=False,
                      score=s[slots[gone]])

    # sortScoresPerImage over all C * top_k slots, then gatherNMSOutputs takes keep_top_k
    flat_score, flat_box = slot_score.ravel(), slot_box.ravel()
    flat_cls = np.repeat(np.arange(c), top_k)
    if tie_order == "stable":
        order = descending_order(flat_score, "stable")
    else:
        # the reversed total order: higher class first; inside a class the slots already put
        # the higher box first
        by_class_desc = (np.arange(c)[::-1, None] * top_k + np.arange(top_k)).ravel()
        order = by_class_desc[descending_order(flat_score[by_class_desc], "stable")]
    written = keep_top_k <= top_k  # gatherNMSOutputs_kernel: `if (keepTopK > topK) return;`
    take = order[:keep_top_k] if written else order[:0]
    row_box, row_cls, row_score = flat_box[take], flat_cls[take], flat_score[take]
    row_valid = row_box >= 0
    row_xyxy = np.zeros((take.size, 4), np.float32)
    src = boxes[row_box[row_valid], row_cls[row_valid]] if boxes.ndim == 3 \
        else boxes[row_box[row_valid]]
    if clip:
        src = np.fmax(np.fmin(src, np.float32(1)), np.float32(0))  # saturate()
    row_xyxy[row_valid] = src
    # pad to keep_top_k rows (only short when keepTopK > topK or C * topK < keepTopK)
    pad = keep_top_k - take.size
    rows = (np.concatenate([np.where(row_valid, row_cls, -1), np.full(pad, -1)]),
            np.concatenate([np.where(row_valid, row_box, -1), np.full(pad, -1)]),
            np.concatenate([row_score, np.zeros(pad, np.float32)]),
            np.concatenate([row_xyxy, np.zeros((pad, 4), np.float32)]))

    if tr is not None:
        survivor = flat_box[order] >= 0
        pos = np.flatnonzero(survivor)
        s_box, s_cls = flat_box[order][pos], flat_cls[order][pos]
        kept = pos < take.size
        tr.record(s_box[kept], s_cls[kept], FateKind.KEPT, rank=pos[kept],
                  score=flat_score[order][pos[kept]])
        # keepTopK > topK: nothing is written, recorded as a max-detections cut with limit 0
        tr.record(s_box[~kept], s_cls[~kept], FateKind.CUT_MAX_DETECTIONS, rank=pos[~kept],
                  limit=keep_top_k if written else 0, score=flat_score[order][pos[~kept]])
        tr.check_complete()

    vb = row_box[row_valid]
    result = NmsResult(boxes=row_xyxy[row_valid], scores=row_score[row_valid],
                       labels=row_cls[row_valid].astype(np.int64), box_index=vb.astype(np.int64),
                       trace=tr)
    return rows, result
