"""mmdet's second-stage post-processing (`BBoxHead._predict_by_feat_single` → mmdet's
`multiclass_nms`, mmdet 3.0.0) in numpy, in trace mode: per RoI and class, a box regressed for
that class and a softmax score; pairs above `score_thr` (strictly) go through mmcv's
`batched_nms` (classes apart), and the first `max_per_img` are kept.

Differences from the one-stage pipeline (harness/nms/mmyolo.py): every class has its own box
(`reg_class_agnostic=False`), there is no `nms_pre`, the boxes are rescaled to the original
image *before* NMS (IoUs are those of original pixels) by multiplying with 1 / scale_factor in
float32 (mmdet's `scale_boxes`), and there is no clamp after it (the decode clipped to the
network input).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from harness.nms.greedy import TieOrder, check_tie_order
from harness.nms.mmyolo import MMCV_SPLIT_THR, mmcv_batched_nms
from harness.nms.trace import FateKind, NmsResult, Trace, finished


def softmax(logits: np.ndarray) -> np.ndarray:
    """torch.softmax over the last axis, in float32 (subtract the max, exp, normalise)."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def rescale_to_original(boxes: np.ndarray, scale_factor: Sequence[float]) -> np.ndarray:
    """mmdet `scale_boxes(boxes, [1 / s for s in scale_factor])`: a float32 multiply by the
    reciprocals (not a division: the two differ in the last bit)."""
    sx, sy = (np.float32(1 / float(s)) for s in scale_factor)
    return (np.asarray(boxes, np.float32) * np.array([sx, sy, sx, sy], np.float32)) \
        .astype(np.float32)


def rcnn_nms(boxes: np.ndarray, scores: np.ndarray, *, score_thr: float,
             iou_threshold: float, max_per_img: int, split_thr: int = MMCV_SPLIT_THR,
             tie_order: TieOrder = "stable", trace: bool = False) -> NmsResult:
    """mmdet `multiclass_nms` for one image.

    boxes: (N, C, 4) float32 xyxy per RoI and class, or (N, 4) shared by every class, in the
    pixels NMS sees (original-image pixels in mmdet's test path). scores: (N, C) float32 class
    scores, background column already dropped. Candidates are the (RoI, class) pairs in
    row-major order (torch.nonzero's); equal scores keep that order ("stable").
    Returns boxes (K, 4), scores, labels, box_index (the RoI row) and a trace of N × C fates.
    """
    check_tie_order(tie_order)
    scores = np.asarray(scores, np.float32)
    n, c = scores.shape
    boxes = np.asarray(boxes, np.float32)
    if boxes.ndim == 2:
        boxes = np.broadcast_to(boxes[:, None, :], (n, c, 4))
    if boxes.shape != (n, c, 4):
        raise ValueError(f"need boxes (N, C, 4) or (N, 4) and scores (N, C); got "
                         f"{boxes.shape}, {scores.shape}")
    tr = Trace.empty(n, c, "mmdet_rcnn") if trace else None
    thr = np.float32(score_thr)
    valid = scores > thr
    rows, cls = np.nonzero(valid)
    if tr is not None:
        brow, bcls = np.nonzero(~valid)
        tr.record(brow, bcls, FateKind.BELOW_SCORE_THRESHOLD, score=scores[brow, bcls],
                  threshold=thr, inclusive=False)
    if rows.size == 0:
        return finished(NmsResult.empty(tr))
    cand_xyxy, cand_score = boxes[rows, cls], scores[rows, cls]
    if tie_order == "reverse":  # the later sorts break ties by position: reverse positions
        flip = np.arange(rows.size)[::-1]
        rows, cls, cand_xyxy, cand_score = rows[flip], cls[flip], cand_xyxy[flip], \
            cand_score[flip]
    keep, sup = mmcv_batched_nms(cand_xyxy, cand_score, cls, iou_threshold,
                                 split_thr=split_thr, tie_order="stable")
    final = keep[:max_per_img] if max_per_img > 0 else keep
    if tr is not None:
        gone = np.flatnonzero(sup.by >= 0)
        tr.record(rows[gone], cls[gone], FateKind.SUPPRESSED, by_box=rows[sup.by[gone]],
                  by_class=cls[sup.by[gone]], iou=sup.iou[gone],
                  threshold=np.float32(iou_threshold), inclusive=False,
                  score=cand_score[gone])
        late = keep[final.size:]
        tr.record(rows[late], cls[late], FateKind.CUT_MAX_DETECTIONS,
                  rank=np.arange(final.size, keep.size), limit=max_per_img,
                  score=cand_score[late])
        tr.record(rows[final], cls[final], FateKind.KEPT, rank=np.arange(final.size),
                  score=cand_score[final])
    result = NmsResult(boxes=cand_xyxy[final].copy(), scores=cand_score[final].copy(),
                       labels=cls[final].astype(np.int64), box_index=rows[final].astype(np.int64),
                       trace=tr)
    return finished(result)

