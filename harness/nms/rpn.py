"""mmdet 3.0.0 RPN proposal selection for one image (Faster R-CNN's `test_cfg.rpn`), in numpy,
with a trace that gives every anchor of every level one fate.

What mmdet does at test time (mmdet/models/dense_heads/rpn_head.py, RPNHead, called through
base_dense_head.py BaseDenseHead.predict_by_feat once per image):

1. `_predict_by_feat_single`, per FPN level: the (A, H, W) objectness map is flattened in
   (H, W, A) order (`permute(1, 2, 0).reshape(-1, 1)`), the (4A, H, W) deltas likewise to
   (H * W * A, 4); score = sigmoid (use_sigmoid_cls, the RPN has one class). When
   `0 < nms_pre < num_anchors` the level is sorted with `scores.sort(descending=True)` and the
   first nms_pre kept (not `topk`: the source keeps topk in a comment, "sort is faster than
   topk"); a level with fewer anchors is not sorted at all. The kept anchors of all levels are
   concatenated level by level, with their level id, and decoded with DeltaXYWHBBoxCoder
   (`delta_xywh_decode` below), which clips to img_shape.
2. `_bbox_post_process`: when `min_bbox_size >= 0` (Faster R-CNN sets 0; absent means -1, off)
   boxes with w <= min_bbox_size or h <= min_bbox_size are dropped: with 0 that removes the
   boxes the clip squashed flat against the image border. Then mmcv's
   `batched_nms(boxes, scores, level_ids, cfg.nms)` (mmcv/ops/nms.py) with the level ids as
   classes: boxes are offset by `level * (boxes.max() + 1)` so levels never overlap (the
   boxes are clipped, so coordinates are >= 0) and one `nms_cpu` runs over all of them below
   split_thr (10000) boxes, one per level above; then `results[:cfg.max_per_img]`, labels 0.

Tie order. torch.sort(descending=True) is unstable and its tie order depends on the build: on
x86 builds with AVX2/AVX512 torch 2.x sorts float32 with x86-simd-sort (`xss_sort_kernel` in
aten/src/ATen/native/cpu/SortingKernel.cpp), elsewhere with std::sort; neither orders equal
scores by index. `tie_order` models it as in the other kernels ("stable": lower anchor index
first in every sort, "reverse": higher first); a proposal that changes between the two was
decided by a tie. Everything else (float32 arithmetic, clip before the size filter and NMS,
strict > comparisons, mmcv's IoU) follows the source.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np

from harness.nms.greedy import TieOrder, check_tie_order, descending_order
from harness.nms.mmyolo import MMCV_SPLIT_THR, mmcv_batched_nms
from harness.nms.trace import FateKind, NmsResult, Trace, finished

Scope = Literal["level", "all"]
SCOPES = ("level", "all")

# mmdet/models/task_modules/coders/delta_xywh_bbox_coder.py: DeltaXYWHBBoxCoder.decode default
WH_RATIO_CLIP = 16 / 1000


@dataclass(frozen=True)
class RpnSettings:
    """The RPN's test_cfg, plus the layouts deployments use instead of mmdet's.

    nms_pre: anchors kept per level (or over all levels, see topk_scope) before NMS; <= 0 or
    >= the count keeps all. max_per_img: proposals kept after NMS. iou_threshold: nms's.
    min_bbox_size: drop boxes with w or h <= it; < 0 turns the filter off (mmdet's default
    when the key is absent). scope: "level" = one NMS per level (mmdet, level ids as
    batched_nms classes), "all" = one NMS over all levels (one class; mmdeploy's RPN rewrite
    and most exported graphs). topk_scope: "level" = nms_pre per level (mmdet, mmdeploy),
    "all" = one TopK of nms_pre over the concatenation of all levels. split_thr: mmcv
    batched_nms's. tie_order: see the module docstring.
    Faster R-CNN (configs/_base_/models/faster-rcnn_r50_fpn.py, test_cfg.rpn): nms_pre 1000,
    max_per_img 1000, nms iou_threshold 0.7, min_bbox_size 0 — the defaults here.
    """

    nms_pre: int = 1000
    max_per_img: int = 1000
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0
    scope: Scope = "level"
    topk_scope: Scope = "level"
    split_thr: int = MMCV_SPLIT_THR
    tie_order: TieOrder = "stable"

    def __post_init__(self) -> None:
        for name in ("scope", "topk_scope"):
            if getattr(self, name) not in SCOPES:
                raise ValueError(f"{name} must be one of {SCOPES}, got {getattr(self, name)!r}")
        check_tie_order(self.tie_order)
        if self.max_per_img < 0:
            # results[:max_per_img] would drop rows from the end; no config means that
            raise ValueError(f"max_per_img must be >= 0, got {self.max_per_img}")

    @classmethod
    def from_test_cfg(cls, rpn_cfg: dict, **overrides: object) -> "RpnSettings":
        """Settings from an mmdet `test_cfg.rpn` dict, with mmdet's defaults for absent keys
        (nms_pre -1, min_bbox_size -1). `nms.class_agnostic=True` maps to scope "all", which is
        exact only below split_thr candidates (above it mmcv still loops over the level ids)."""
        nms = dict(rpn_cfg.get("nms") or {})
        if nms.get("type", "nms") != "nms":
            raise ValueError(f"only nms type 'nms' is modelled, got {nms.get('type')!r}")
        values = dict(nms_pre=int(rpn_cfg.get("nms_pre", -1)),
                      max_per_img=int(rpn_cfg["max_per_img"]),
                      iou_threshold=float(nms["iou_threshold"]),
                      min_bbox_size=float(rpn_cfg.get("min_bbox_size", -1)),
                      scope="all" if nms.get("class_agnostic", False) else "level",
                      split_thr=int(nms.get("split_thr", MMCV_SPLIT_THR)))
        values.update(overrides)
        return cls(**values)


@dataclass
class RpnResult(NmsResult):
    """Proposals of one image in mmdet's output order (NmsResult's fields: boxes (K, 4) xyxy
    float32 clipped to img_shape, scores (K,) float32 objectness, labels (K,) all 0 as mmdet
    sets them, box_index (K,) index in the concatenation of all levels' anchors; trace: one fate
    per anchor, one class). levels: (K,) FPN level of each proposal. anchor_level: (N,) level
    of every anchor, to place a trace's by_box on its level."""

    levels: Optional[np.ndarray] = None
    anchor_level: Optional[np.ndarray] = None


def flatten_rpn_level(cls_score: np.ndarray,
                      bbox_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image's maps of one level, (A, H, W) logits and (4A, H, W) deltas, flattened as
    RPNHead._predict_by_feat_single does (`permute(1, 2, 0).reshape(-1, ...)`): (H*W*A,) and
    (H*W*A, 4), anchor a of cell (h, w) at row (h * W + w) * A + a, as grid_priors orders them."""
    cls_score = np.asarray(cls_score, np.float32)
    bbox_pred = np.asarray(bbox_pred, np.float32)
    if cls_score.ndim != 3 or bbox_pred.shape != (4 * cls_score.shape[0],) + cls_score.shape[1:]:
        raise ValueError(f"need (A, H, W) and (4A, H, W) maps; got {cls_score.shape}, "
                         f"{bbox_pred.shape}")
    return (cls_score.transpose(1, 2, 0).reshape(-1),
            bbox_pred.transpose(1, 2, 0).reshape(-1, 4))


def exp_f32(x: np.ndarray) -> np.ndarray:
    """float32 exp rounded once from float64: torch's float32 exp agrees with it on ~99% of
    inputs, numpy's own float32 exp on ~60% (measured on torch 2.13 CPU, AVX512)."""
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def sigmoid_f32(x: np.ndarray) -> np.ndarray:
    """float32 `1 / (1 + exp(-x))` (mmdet: `cls_score.sigmoid()`); torch's vectorised float32
    sigmoid agrees bit for bit on ~96% of inputs and is within 1 ulp on the rest."""
    x = np.asarray(x, np.float32)
    one = np.float32(1)
    return one / (one + exp_f32(-x))


def delta_xywh_decode(rois: np.ndarray, deltas: np.ndarray,
                      means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                      stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                      max_shape: Optional[Sequence[int]] = None,
                      wh_ratio_clip: float = WH_RATIO_CLIP,
                      clip_border: bool = True) -> np.ndarray:
    """mmdet 3.0.0 `delta2bbox` (coders/delta_xywh_bbox_coder.py, what
    DeltaXYWHBBoxCoder.decode calls for one image), in float32 as torch computes it.

    rois: (M, 4) xyxy anchors or RoIs; deltas: (M, 4) or (M, 4 * C) (the box head's per-class
    deltas, each class decoded against the same RoI). means/stds: the coder's target_means /
    target_stds (RPN: 0 / 1; Faster R-CNN's box head: 0 / (0.1, 0.1, 0.2, 0.2)).
    Steps: d = deltas * stds + means; centre (x1 + x2) * 0.5 and size x2 - x1 of the RoI;
    centre += size * d_xy; d_wh clamped to +-|log(wh_ratio_clip)| (float32, as torch.clamp casts
    the bound); size *= exp(d_wh); corners = centre -+ size * 0.5; then, when clip_border and
    max_shape (h, w[, c]) is given, x clamped to [0, w] and y to [0, h] — inside the decode,
    so before any size filter or NMS. Returns (M, 4 * C) float32.
    """
    rois = np.asarray(rois, np.float32).reshape(-1, 4)
    deltas = np.asarray(deltas, np.float32)
    m = deltas.shape[0]
    if m == 0:
        return deltas.reshape(0, deltas.shape[1] if deltas.ndim == 2 else 4)
    c = deltas.shape[1] // 4
    d = deltas.reshape(-1, 4) * np.asarray(stds, np.float32) + np.asarray(means, np.float32)
    r = np.repeat(rois, c, axis=0)  # rois.repeat(1, num_classes).reshape(-1, 4)
    pxy = (r[:, :2] + r[:, 2:]) * np.float32(0.5)
    pwh = r[:, 2:] - r[:, :2]
    max_ratio = np.float32(np.abs(np.log(wh_ratio_clip)))
    dwh = np.clip(d[:, 2:], -max_ratio, max_ratio)
    gxy = pxy + pwh * d[:, :2]
    gwh = pwh * exp_f32(dwh)
    half = gwh * np.float32(0.5)
    boxes = np.concatenate([gxy - half, gxy + half], axis=1)
    if clip_border and max_shape is not None:
        zero = np.float32(0)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], zero, np.float32(max_shape[1]))
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], zero, np.float32(max_shape[0]))
    return boxes.reshape(m, 4 * c)


def rpn_proposals(objectness_logits: Sequence[np.ndarray], deltas: Sequence[np.ndarray],
                  anchors: Sequence[np.ndarray], img_shape: Sequence[int],
                  settings: RpnSettings = RpnSettings(),
                  means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                  stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                  *, trace: bool = True) -> RpnResult:
    """RPNHead.predict_by_feat's proposals for one image (see the module docstring).

    objectness_logits: per level, (N_l,) logits in (H, W, A) order (`flatten_rpn_level`);
    deltas: per level, (N_l, 4); anchors: per level, (N_l, 4) xyxy, as the head's
    prior_generator.grid_priors gives them. img_shape: (h, w) the boxes are clipped to.
    means, stds: the RPN coder's target_means / target_stds.
    Returns an RpnResult; its trace (when `trace`) has one row per anchor, in the
    concatenation of all levels, one class: CUT_PRE_NMS_TOPK (rank in its level's descending
    order, or over all levels with topk_scope "all"; limit nms_pre), BELOW_MIN_BBOX_SIZE,
    SUPPRESSED (by_box: the suppressor's anchor index, iou as mmcv computed it on the offset
    boxes), CUT_MAX_DETECTIONS (rank among NMS survivors), KEPT (rank = output row); every row
    carries its objectness score.
    """
    s = settings
    if not len(objectness_logits) == len(deltas) == len(anchors):
        raise ValueError("need the same number of levels of logits, deltas and anchors")
    logits = [np.asarray(x, np.float32).reshape(-1) for x in objectness_logits]
    sizes = np.array([x.size for x in logits], np.int64)
    all_deltas = np.concatenate([np.asarray(d, np.float32).reshape(-1, 4) for d in deltas])
    all_anchors = np.concatenate([np.asarray(a, np.float32).reshape(-1, 4) for a in anchors])
    n = int(sizes.sum())
    if all_deltas.shape[0] != n or all_anchors.shape[0] != n:
        raise ValueError(f"per-level counts of logits {sizes.tolist()} do not match the deltas "
                         f"({all_deltas.shape[0]}) or anchors ({all_anchors.shape[0]})")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    anchor_level = np.repeat(np.arange(sizes.size), sizes)
    scores = sigmoid_f32(np.concatenate(logits)) if n else np.zeros(0, np.float32)
    tr = Trace.empty(n, 1, "mmdet_rpn") if trace else None

    # step 1: pre-NMS TopK, `if 0 < nms_pre < scores.shape[0]: scores.sort(descending=True)`,
    # then [:nms_pre] (rpn_head.py _predict_by_feat_single)
    groups = [(0, n)] if s.topk_scope == "all" else zip(starts[:-1], starts[1:])
    picked = []
    for lo, hi in groups:
        if 0 < s.nms_pre < hi - lo:
            order = lo + descending_order(scores[lo:hi], s.tie_order)
            picked.append(order[:s.nms_pre])
            if tr is not None:
                cut = order[s.nms_pre:]
                tr.record(cut, 0, FateKind.CUT_PRE_NMS_TOPK, rank=np.arange(s.nms_pre, hi - lo),
                          limit=s.nms_pre, score=scores[cut])
        else:
            picked.append(np.arange(lo, hi))
    # candidates in anchor order: every later sort then breaks ties by anchor index, in the
    # direction tie_order says (the order mmdet concatenates in only matters for ties)
    cand = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)

    # step 2: decode the kept anchors, clipped to img_shape (bbox_coder.decode(max_shape=...))
    boxes = delta_xywh_decode(all_anchors[cand], all_deltas[cand], means, stds,
                              max_shape=img_shape)
    cand_score = scores[cand]

    # step 3: _bbox_post_process's size filter: keep w > min_bbox_size and h > min_bbox_size
    if s.min_bbox_size >= 0:
        m = np.float32(s.min_bbox_size)
        big = (boxes[:, 2] - boxes[:, 0] > m) & (boxes[:, 3] - boxes[:, 1] > m)
        if tr is not None:
            tr.record(cand[~big], 0, FateKind.BELOW_MIN_BBOX_SIZE, threshold=m,
                      inclusive=False, score=cand_score[~big])
        cand, boxes, cand_score = cand[big], boxes[big], cand_score[big]

    if cand.size == 0:
        return finished(RpnResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                  np.zeros(0, np.int64), np.zeros(0, np.int64), tr,
                                  levels=np.zeros(0, np.int64), anchor_level=anchor_level))

    # step 4: mmcv batched_nms with the level ids as classes ("level") or one class ("all"),
    # then results[:cfg.max_per_img]
    nms_labels = anchor_level[cand] if s.scope == "level" else np.zeros(cand.size, np.int64)
    keep, sup = mmcv_batched_nms(boxes, cand_score, nms_labels, s.iou_threshold,
                                 split_thr=s.split_thr, tie_order=s.tie_order)
    final = keep[:s.max_per_img]

    if tr is not None:
        gone = np.flatnonzero(sup.by >= 0)
        tr.record(cand[gone], 0, FateKind.SUPPRESSED, by_box=cand[sup.by[gone]], by_class=0,
                  iou=sup.iou[gone], threshold=np.float32(s.iou_threshold), inclusive=False,
                  score=cand_score[gone])
        late = keep[final.size:]
        tr.record(cand[late], 0, FateKind.CUT_MAX_DETECTIONS,
                  rank=np.arange(final.size, keep.size), limit=s.max_per_img,
                  score=cand_score[late])
        tr.record(cand[final], 0, FateKind.KEPT, rank=np.arange(final.size),
                  score=cand_score[final])

    idx = cand[final]
    return finished(RpnResult(boxes=boxes[final].copy(), scores=cand_score[final].copy(),
                              labels=np.zeros(final.size, np.int64), box_index=idx.astype(np.int64),
                              trace=tr, levels=anchor_level[idx], anchor_level=anchor_level))
