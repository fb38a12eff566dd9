"""mmyolo 0.6.0 post-processing of one image (YOLOv5Head.predict_by_feat, which YOLOv8 and the
other mmyolo heads inherit), on decoded candidates: objectness filter, mmdet's
filter_scores_and_topk, rescale, mmdet's _bbox_post_process with mmcv 2.0.1's batched_nms, clamp.

Every step follows docs/nms-semantics.md "mmyolo predict_by_feat" in float32, as torch computes it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from harness.nms.greedy import (
    Suppression, TieOrder, check_tie_order, descending_order, greedy_suppress,
)
from harness.nms.trace import FateKind, NmsResult, Trace, finished

# mmcv.ops.batched_nms: one NMS over offset boxes below this many boxes, per class from it
MMCV_SPLIT_THR = 10000


def mmyolo_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    objectness: Optional[np.ndarray] = None,
    *,
    score_thr: float,
    nms_pre: int = 100000,
    iou_threshold: float,
    max_per_img: int,
    multi_label: bool,
    yolox_style: bool = False,
    pad_left_top: Sequence[float] = (0.0, 0.0),
    scale_factor: Sequence[float] = (1.0, 1.0),
    clamp_hw: Optional[Sequence[float]] = None,
    min_bbox_size: float = -1.0,
    class_agnostic: bool = False,
    split_thr: int = MMCV_SPLIT_THR,
    tie_order: TieOrder = "stable",
    trace: bool = False,
) -> NmsResult:
    """mmyolo's detections for one image.

    boxes: (N, 4) float32 xyxy, decoded, in network-input pixels.
    scores: (N, C) float32 class scores after sigmoid. objectness: (N,) after sigmoid, or None.
    score_thr, nms_pre, iou_threshold (test_cfg.nms.iou_threshold), max_per_img, multi_label,
    yolox_style, min_bbox_size: the model's test_cfg (score_thr -1, nms_pre 100000 and
    min_bbox_size -1 (off) are mmyolo's and mmdet's defaults when the config has none). class_agnostic, split_thr:
    test_cfg.nms's optional keys, as mmcv reads them.
    pad_left_top: (pad_param[2], pad_param[0]); scale_factor: (sx, sy) from the image meta.
    clamp_hw: ori_shape (h, w) to clamp to, or None to skip the clamp.
    tie_order: the one order all of the pipeline's sorts give equal scores: "stable", lower
    candidate first (candidates numbered box * C + class, torch.nonzero's order; by box
    without multi_label); "reverse", higher first. torch.sort (filter_scores_and_topk, mmcv's
    CPU nms, batched_nms) is unstable and documents no tie order, so either is a model, not a
    guarantee; a detection that differs between the two is decided by a tie.

    Returns boxes (K, 4) xyxy in the original image, clamped; scores (K,); labels (K,);
    box_index (K,) rows of `boxes`; trace (N x C fates) when `trace`.
    """
    check_tie_order(tie_order)
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.ndim != 2 \
            or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"need boxes (N, 4) and scores (N, C); got {boxes.shape}, {scores.shape}")
    n, c = scores.shape
    tr = Trace.empty(n, c, "mmyolo") if trace else None
    thr = np.float32(score_thr)  # torch compares a float32 tensor with a Python float in float32

    # step 1: one class never takes the multi-label path
    multi_label = bool(multi_label) and c > 1

    # step 2: objectness pre-filter, then score = cls * obj
    alive = np.arange(n)
    if objectness is not None:
        objectness = np.asarray(objectness, np.float32).reshape(n)
        if score_thr > 0 and not yolox_style:
            passed = objectness > thr
            if tr is not None:
                dropped = np.flatnonzero(~passed)
                tr.record(dropped[:, None], np.arange(c)[None, :], FateKind.OBJECTNESS_FILTERED,
                          score=objectness[dropped][:, None], threshold=thr, inclusive=False)
            alive = np.flatnonzero(passed)
        scores_alive = scores[alive] * objectness[alive][:, None]
    else:
        scores_alive = scores[alive]
    if alive.size == 0:
        return finished(NmsResult.empty(tr))

    # step 3: mmdet filter_scores_and_topk (valid = score > score_thr, torch.nonzero order,
    # descending sort, first nms_pre)
    if multi_label:
        valid = scores_alive > thr
        rows, cand_cls = np.nonzero(valid)
        if tr is not None:
            brow, bcls = np.nonzero(~valid)
            tr.record(alive[brow], bcls, FateKind.BELOW_SCORE_THRESHOLD,
                      score=scores_alive[brow, bcls], threshold=thr, inclusive=False)
        cand_box = alive[rows]
        cand_score = scores_alive[rows, cand_cls]
    else:
        # scores.max(1): the first maximal class (torch documents the first index)
        best = np.argmax(scores_alive, axis=1)
        best_score = scores_alive[np.arange(alive.size), best]
        if tr is not None:
            other = np.ones(scores_alive.shape, bool)
            other[np.arange(alive.size), best] = False
            orow, ocls = np.nonzero(other)
            tr.record(alive[orow], ocls, FateKind.NOT_BEST_CLASS,
                      score=scores_alive[orow, ocls], by_class=best[orow])
        valid = best_score > thr
        if tr is not None:
            bad = np.flatnonzero(~valid)
            tr.record(alive[bad], best[bad], FateKind.BELOW_SCORE_THRESHOLD,
                      score=best_score[bad], threshold=thr, inclusive=False)
        cand_box, cand_cls, cand_score = alive[valid], best[valid], best_score[valid]

    order = descending_order(cand_score, tie_order)
    top = order[:min(nms_pre, order.size)]  # Python slicing, as the torch code slices
    if tr is not None:
        cut = order[top.size:]
        tr.record(cand_box[cut], cand_cls[cut], FateKind.CUT_PRE_NMS_TOPK,
                  rank=np.arange(top.size, order.size), limit=nms_pre, score=cand_score[cut])
    order = top
    cand_box, cand_cls, cand_score = cand_box[order], cand_cls[order], cand_score[order]

    # step 4: rescale to the original image, before NMS (float32, as results.bboxes is)
    pad = np.asarray([pad_left_top[0], pad_left_top[1]] * 2, np.float32)
    scale = np.asarray([scale_factor[0], scale_factor[1]] * 2, np.float32)
    cand_xyxy = (boxes[cand_box] - pad) / scale

    if yolox_style:
        max_per_img = int(cand_box.size)  # "do not need max_per_img"

    # step 5: mmdet _bbox_post_process: min_bbox_size filter, batched_nms, [:max_per_img]
    if min_bbox_size >= 0:
        m = np.float32(min_bbox_size)
        w = cand_xyxy[:, 2] - cand_xyxy[:, 0]
        h = cand_xyxy[:, 3] - cand_xyxy[:, 1]
        big = (w > m) & (h > m)
        if tr is not None:
            tr.record(cand_box[~big], cand_cls[~big], FateKind.BELOW_MIN_BBOX_SIZE,
                      threshold=m, inclusive=False, score=cand_score[~big])
        cand_box, cand_cls, cand_score = cand_box[big], cand_cls[big], cand_score[big]
        cand_xyxy = cand_xyxy[big]

    if cand_box.size == 0:
        return finished(NmsResult.empty(tr))
    # candidates are now positions in the tie order chosen above; the later sorts (nms_cpu,
    # the split branch's re-sort) keep that one total order, so they break ties by position
    keep, sup = mmcv_batched_nms(cand_xyxy, cand_score, cand_cls, iou_threshold,
                                 class_agnostic=class_agnostic, split_thr=split_thr,
                                 tie_order="stable")
    final = keep[:max_per_img]  # results[:cfg.max_per_img]

    if tr is not None:
        gone = np.flatnonzero(sup.by >= 0)
        tr.record(cand_box[gone], cand_cls[gone], FateKind.SUPPRESSED,
                  by_box=cand_box[sup.by[gone]], by_class=cand_cls[sup.by[gone]],
                  iou=sup.iou[gone], threshold=np.float32(iou_threshold), inclusive=False,
                  score=cand_score[gone])
        late = keep[final.size:]
        tr.record(cand_box[late], cand_cls[late], FateKind.CUT_MAX_DETECTIONS,
                  rank=np.arange(final.size, keep.size), limit=max_per_img,
                  score=cand_score[late])
        tr.record(cand_box[final], cand_cls[final], FateKind.KEPT,
                  rank=np.arange(final.size), score=cand_score[final])

    # step 6: clamp to the original image, after NMS
    out = cand_xyxy[final].copy()
    if clamp_hw is not None:
        h_img, w_img = np.float32(clamp_hw[0]), np.float32(clamp_hw[1])
        out[:, 0::2] = np.clip(out[:, 0::2], np.float32(0), w_img)
        out[:, 1::2] = np.clip(out[:, 1::2], np.float32(0), h_img)
    result = NmsResult(boxes=out, scores=cand_score[final].copy(),
                       labels=cand_cls[final].astype(np.int64),
                       box_index=cand_box[final].astype(np.int64), trace=tr)
    return finished(result)


def mmcv_batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                     iou_threshold: float, *, class_agnostic: bool = False,
                     split_thr: int = MMCV_SPLIT_THR,
                     tie_order: TieOrder = "stable") -> tuple[np.ndarray, Suppression]:
    """mmcv 2.0.1 `batched_nms(boxes, scores, labels, dict(iou_threshold=...))` on CPU.

    boxes: (M, 4) float32 xyxy; scores: (M,) float32; labels: (M,) int class.
    Returns keep: (K,) indices into the inputs in output order, and the Suppression record
    (by / iou per input index). mmcv/ops/nms.py: boxes are offset by label * (max + 1) in
    float32 unless class_agnostic; with fewer than split_thr boxes one NMS runs over all of
    them (so classes can interact when coordinates are below -1), otherwise one NMS per class
    on the same offset boxes, and the union is re-sorted by score.
    """
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels)
    m = boxes.shape[0]
    if m == 0:
        return np.zeros(0, np.int64), Suppression(np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                  np.zeros(0, np.float32))
    if class_agnostic:
        for_nms = boxes
    else:
        max_coordinate = boxes.max()
        offsets = labels.astype(np.float32) * (max_coordinate + np.float32(1))
        for_nms = boxes + offsets[:, None]
    iou_fn = _mmcv_iou(for_nms)
    thr = np.float32(iou_threshold)  # nms_cpu takes `float iou_threshold`

    if m < split_thr:
        # nms_cpu sorts the scores itself; keep comes back in that order
        order = descending_order(scores, tie_order)
        groups = None if class_agnostic else _interacting_classes(for_nms, labels, thr)
        sup = greedy_suppress(order, m, iou_fn, thr, inclusive=False, groups=groups)
        return sup.kept, sup
    by = np.full(m, -1, np.int64)
    ious = np.full(m, np.nan, np.float32)
    kept_mask = np.zeros(m, bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = members[descending_order(scores[members], tie_order)]
        part = greedy_suppress(order, m, iou_fn, thr, inclusive=False)
        kept_mask[part.kept] = True
        hit = part.by >= 0
        by[hit], ious[hit] = part.by[hit], part.iou[hit]
    keep = np.flatnonzero(kept_mask)
    keep = keep[descending_order(scores[keep], tie_order)]
    return keep, Suppression(kept=keep, by=by, iou=ious)


def _mmcv_iou(b: np.ndarray):
    """IoU as mmcv/ops/csrc/pytorch/cpu/nms.cpp computes it (offset 0, float32)."""
    x1, y1, x2, y2 = (np.ascontiguousarray(b[:, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    zero = np.float32(0)

    def iou(i: np.ndarray, js: np.ndarray) -> np.ndarray:
        # std::max(a, b) is (a < b) ? b : a and std::min(a, b) is (b < a) ? b : a
        xx1 = np.where(x1[i] < x1[js], x1[js], x1[i])
        yy1 = np.where(y1[i] < y1[js], y1[js], y1[i])
        xx2 = np.where(x2[js] < x2[i], x2[js], x2[i])
        yy2 = np.where(y2[js] < y2[i], y2[js], y2[i])
        dw, dh = xx2 - xx1, yy2 - yy1
        inter = np.where(zero < dw, dw, zero) * np.where(zero < dh, dh, zero)
        with np.errstate(divide="ignore", invalid="ignore"):
            return inter / (areas[i] + areas[js] - inter)

    return iou


def _interacting_classes(for_nms: np.ndarray, labels: np.ndarray,
                         thr: np.float32) -> Optional[np.ndarray]:
    """Group ids so that classes whose offset boxes can overlap share a group.

    Only a speed-up of the single NMS: boxes with no positive x-overlap have inter = 0, so
    their IoU (0, or nan for empty boxes) is never > thr when thr >= 0. Classes whose x-extents
    overlap (coordinates below -1, or float32 rounding of the offsets) are merged, so the result
    stays that of one NMS over all boxes.
    """
    if not thr >= 0 or not np.isfinite(for_nms).all():
        return None
    classes, inverse = np.unique(labels, return_inverse=True)
    lo = np.full(classes.size, np.inf, np.float64)
    hi = np.full(classes.size, -np.inf, np.float64)
    np.minimum.at(lo, inverse, for_nms[:, 0])
    np.maximum.at(hi, inverse, for_nms[:, 2])
    group_of_class = np.empty(classes.size, np.int64)
    group, reach = -1, -np.inf
    for k in np.argsort(lo, kind="stable"):
        if not lo[k] < reach:  # no positive overlap with anything earlier: new group
            group += 1
            reach = hi[k]
        else:
            reach = max(reach, hi[k])
        group_of_class[k] = group
    return group_of_class[inverse]
