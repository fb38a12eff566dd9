"""TensorRT's EfficientNMS_TRT plugin (plugin/efficientNMSPlugin, TensorRT 8.6 - 10.x), in fp32:
inclusive (>=) score and IoU tests, one global pre-NMS cap across classes, and greedy NMS in a
single class-mixed score order (docs/nms-semantics.md "TensorRT EfficientNMS_TRT").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from harness.nms.greedy import TieOrder, check_tie_order, descending_order, greedy_suppress
from harness.nms.trace import FateKind, NmsResult, Trace

# numSelectedBoxes: 5000 from TensorRT 8.5.1 on GPUs with 64K registers per block (2000 on
# Jetson TX1/TX2); 4096 in TensorRT <= 8.4 (the README still says 4096).
EFFICIENT_NMS_CAP = 5000
EFFICIENT_NMS_CAP_TRT84 = 4096
# EfficientNMSFilterLauncher: below this threshold the "dense" kernel keeps every element and
# writes this sentinel over the scores that fail
DENSE_PATH_THRESHOLD = np.float32(0.007)
DENSE_SENTINEL = np.float32(-(1 << 15))


@dataclass
class EfficientNmsOutput:
    """The plugin's four outputs plus what the reference knows besides.

    num_detections (B, 1) int32; detection_boxes (B, K, 4) float32 corners in the input's
    axis order; detection_scores (B, K) float32; detection_classes (B, K) int32; rows past
    num_detections are zero. detection_indices (B, K) int64: input box row, -1 past
    num_detections (not a plugin output). results: one NmsResult per image.
    """

    num_detections: np.ndarray
    detection_boxes: np.ndarray
    detection_scores: np.ndarray
    detection_classes: np.ndarray
    detection_indices: np.ndarray
    results: list[NmsResult]

    @property
    def traces(self) -> list[Optional[Trace]]:
        return [r.trace for r in self.results]


def logit_threshold(score_threshold: float) -> np.float32:
    """The threshold score_activation compares raw scores with: logf(t / (1 - t)) in float32,
    or -32768 for t <= 0 (EfficientNMSFilterLauncher)."""
    t = np.float32(score_threshold)
    if t <= 0:
        return DENSE_SENTINEL
    # host-side logf of a float32 quotient; log in double then rounded (glibc's logf is
    # correctly rounded, so this matches it)
    q = t / (np.float32(1) - t)
    return np.float32(math.log(float(q)))


def efficient_nms_trt(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    score_threshold: float,
    iou_threshold: float,
    max_output_boxes: int,
    background_class: int = -1,
    score_activation: bool = False,
    box_coding: int = 0,
    class_agnostic: bool = False,
    cap: int = EFFICIENT_NMS_CAP,
    tie_order: TieOrder = "stable",
    dense_sentinels: bool = False,
    trace: bool = False,
) -> EfficientNmsOutput:
    """EfficientNMS_TRT on fp32 inputs (attributes named as the plugin names them).

    boxes: (B, N, 4) shared by all classes, or (B, N, C, 4) per class; box_coding 0: two
    opposite corners, either order; 1: centre-size [x, y, w, h] (output as corners).
    scores: (B, N, C), raw logits when score_activation.
    Steps: keep score >= score_threshold (logit_threshold(...) with score_activation) and not
    background_class; sort descending over all classes (tie_order "stable": lower
    anchor * C + class first, as the dense path orders ties; the filter path's tie order is
    not deterministic); the first `cap` go on; greedy NMS in that one order, suppressing a
    candidate whose IoU with a kept box of its class (any class if class_agnostic) is >=
    iou_threshold; the first max_output_boxes survivors are the output (sigmoid applied to
    their scores with score_activation).
    cap: 5000 (TensorRT >= 8.5.1), EFFICIENT_NMS_CAP_TRT84 = 4096 for TensorRT <= 8.4, 2000 on
    Jetson TX1/TX2.
    dense_sentinels: model the dense path literally (unverified on a GPU): when the effective
    threshold is below 0.007 (its logit with score_activation), failing and background scores
    become -32768 and still enter the sort, so with fewer than `cap` passing candidates
    sentinel rows can reach the output. False: they never do (SPEC: drop such rows).
    fp32 only: fp16 engines (half-precision IoU, scoreBits) are not modelled; the sigmoid is
    exact here while the plugin uses __expf, so activated scores may differ by a few ulp.
    """
    check_tie_order(tie_order)
    if not score_threshold >= 0:
        raise ValueError(f"score_threshold must be >= 0 (the plugin validates it), got "
                         f"{score_threshold}")
    if not iou_threshold > 0:
        raise ValueError(f"iou_threshold must be > 0 (the plugin validates it), got "
                         f"{iou_threshold}")
    if max_output_boxes <= 0:
        raise ValueError(f"max_output_boxes must be > 0, got {max_output_boxes}")
    if box_coding not in (0, 1):
        raise ValueError(f"box_coding must be 0 or 1, got {box_coding}")
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (B, N, C), got {scores.shape}")
    bsz, n, c = scores.shape
    if boxes.shape not in ((bsz, n, 4), (bsz, n, 1, 4), (bsz, n, c, 4)):
        raise ValueError(f"boxes must be (B, N, 4), (B, N, 1, 4) or (B, N, C, 4) for scores "
                         f"{scores.shape}; got {boxes.shape}")
    if boxes.ndim == 4 and boxes.shape[2] == 1:
        boxes = boxes[:, :, 0]

    if score_activation:
        thr = logit_threshold(score_threshold)
        dense_below = logit_threshold(float(DENSE_PATH_THRESHOLD))
    else:
        thr = np.float32(score_threshold)
        dense_below = DENSE_PATH_THRESHOLD
    sentinels = dense_sentinels and thr < dense_below
    iou_thr = np.float32(iou_threshold)

    k = int(max_output_boxes)
    num = np.zeros((bsz, 1), np.int32)
    out_boxes = np.zeros((bsz, k, 4), np.float32)
    out_scores = np.zeros((bsz, k), np.float32)
    out_classes = np.zeros((bsz, k), np.int32)
    out_index = np.full((bsz, k), -1, np.int64)
    results = []
    for b in range(bsz):
        r = _image(boxes[b], scores[b], thr, iou_thr, k, background_class, score_activation,
                   box_coding, class_agnostic, cap, tie_order, sentinels, trace)
        m = len(r)
        num[b, 0] = m
        out_boxes[b, :m], out_scores[b, :m] = r.boxes, r.scores
        out_classes[b, :m], out_index[b, :m] = r.labels, r.box_index
        results.append(r)
    return EfficientNmsOutput(num, out_boxes, out_scores, out_classes, out_index, results)


def _to_corners(boxes: np.ndarray, box_coding: int) -> np.ndarray:
    """(..., 4) boxes as BoxCorner: unchanged for coding 0; for 1, BoxCenterSize -> BoxCorner
    (centre -/+ size * 0.5, float32)."""
    if box_coding == 0:
        return boxes
    half = boxes[..., 2:] * np.float32(0.5)
    return np.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def _reordered(corners: np.ndarray) -> np.ndarray:
    """BoxCorner::reorder(): swap a reversed pair with the plugin's add/sub trick, bit for bit."""
    out = corners.copy()
    for lo, hi in ((0, 2), (1, 3)):
        a, b = corners[:, lo], corners[:, hi]
        swap = a > b
        t = a - b          # y1 = y1 - y2
        new_hi = t + b     # y2 = y1 + y2
        new_lo = new_hi - t  # y1 = y2 - y1
        out[:, lo] = np.where(swap, new_lo, a)
        out[:, hi] = np.where(swap, new_hi, b)
    return out


def _area(b0, b1, b2, b3):
    """BoxCorner::area(): 0 unless both sides are positive, else h * w."""
    h = b2 - b0
    w = b3 - b1
    return np.where((h <= 0) | (w <= 0), np.float32(0), h * w)


def _efficient_iou(corners: np.ndarray):
    """IOU() of efficientNMSInference.cu on reordered corners, fp32."""
    r = _reordered(corners)
    c0, c1, c2, c3 = (np.ascontiguousarray(r[:, k]) for k in range(4))
    areas = _area(c0, c1, c2, c3)
    zero = np.float32(0)

    def iou(i: np.ndarray, js: np.ndarray) -> np.ndarray:
        # intersect(b1 = candidate js, b2 = kept i): a.y1 > b.y1 ? a.y1 : b.y1, ...
        i0 = np.where(c0[js] > c0[i], c0[js], c0[i])
        i1 = np.where(c1[js] > c1[i], c1[js], c1[i])
        i2 = np.where(c2[js] < c2[i], c2[js], c2[i])
        i3 = np.where(c3[js] < c3[i], c3[js], c3[i])
        inter = _area(i0, i1, i2, i3)
        union = areas[js] + areas[i] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            value = inter / union
        return np.where((inter <= zero) | (union <= zero), zero, value).astype(np.float32)

    return iou


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _image(boxes, scores, thr, iou_thr, k, background, activation, coding, agnostic, cap,
           tie_order, sentinels, trace) -> NmsResult:
    n, c = scores.shape
    tr = Trace.empty(n, c, "efficient_nms") if trace else None
    flat = scores.ravel()  # element = anchor * C + class, the plugin's scoresInput index
    anchor, cls = np.divmod(np.arange(flat.size), c)
    is_bg = cls == background
    passed = (flat >= thr) & ~is_bg
    if tr is not None:
        low = np.flatnonzero(~passed & ~is_bg)
        tr.record(anchor[low], cls[low], FateKind.BELOW_SCORE_THRESHOLD, score=flat[low],
                  threshold=thr, inclusive=True)
        bg = np.flatnonzero(is_bg)
        tr.record(anchor[bg], cls[bg], FateKind.BACKGROUND_CLASS)

    if sentinels:
        keys = np.where(passed, flat, DENSE_SENTINEL)
        order = descending_order(keys, tie_order)
    else:
        keys = flat
        cand = np.flatnonzero(passed)
        order = cand[descending_order(flat[cand], tie_order)]
    go_on = order[:cap]
    if tr is not None:
        cut = order[cap:]
        cut_real = cut[passed[cut]]  # sentinels past the cap keep their threshold fate
        tr.record(anchor[cut_real], cls[cut_real], FateKind.CUT_PRE_NMS_TOPK,
                  rank=np.flatnonzero(passed[cut]) + cap, limit=cap, score=flat[cut_real])

    # NMS over candidate positions 0..M-1 in sorted order
    g_anchor, g_cls = anchor[go_on], cls[go_on]
    per_class_boxes = boxes.ndim == 3
    raw = boxes[g_anchor, g_cls] if per_class_boxes else boxes[g_anchor]
    corners = _to_corners(raw, coding)
    sup = greedy_suppress(np.arange(go_on.size), go_on.size, _efficient_iou(corners),
                          iou_thr, inclusive=True, groups=None if agnostic else g_cls)
    out = sup.kept[:k]
    if tr is not None:
        gone = np.flatnonzero(sup.by >= 0)
        tr.record(g_anchor[gone], g_cls[gone], FateKind.SUPPRESSED,
                  by_box=g_anchor[sup.by[gone]], by_class=g_cls[sup.by[gone]],
                  iou=sup.iou[gone], threshold=iou_thr, inclusive=True,
                  score=keys[go_on[gone]])
        late = sup.kept[out.size:]
        tr.record(g_anchor[late], g_cls[late], FateKind.CUT_MAX_DETECTIONS,
                  rank=np.arange(out.size, sup.kept.size), limit=k, score=keys[go_on[late]])
        tr.record(g_anchor[out], g_cls[out], FateKind.KEPT, rank=np.arange(out.size),
                  score=keys[go_on[out]])
        tr.check_complete()
    out_scores = keys[go_on[out]]
    if activation:
        out_scores = _sigmoid(out_scores)
    return NmsResult(boxes=corners[out].astype(np.float32), scores=out_scores,
                     labels=g_cls[out].astype(np.int64), box_index=g_anchor[out].astype(np.int64),
                     trace=tr)
