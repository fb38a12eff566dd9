"""The mmyolo reference kernel == mmyolo 0.6.0's own YOLOv5Head.predict_by_feat (mmdet 3.0,
mmcv 2.0.1 ops) on random decoded candidates, exactly in float32, on both mmcv batched_nms
branches; plus hand-built cases for each step and the trace."""
from __future__ import annotations

import numpy as np
import pytest

from harness.nms import MMCV_SPLIT_THR, mmcv_batched_nms, mmyolo_nms
from harness.nms.trace import FateKind, NmsResult
from tests.nms.conftest import assert_trace_consistent, need

MM_INSTALL = "the mm extra (pip install -e .[mm]) and mmcv 2.0.1 built by tools/build_mmcv.py"


# ---------------------------------------------------------------- random candidates

def _clustered_boxes(rng, n: int, lo: float = -20.0, hi: float = 660.0) -> np.ndarray:
    """(n, 4) xyxy float32 boxes jittered around a few centres, so NMS has work to do."""
    k = max(n // 25, 1)
    centres = rng.uniform(lo, hi, (k, 2))
    sizes = rng.uniform(8, 120, (k, 2))
    pick = rng.integers(0, k, n)
    wh = sizes[pick] * rng.uniform(0.8, 1.25, (n, 2))
    ctr = centres[pick] + rng.normal(0, 4, (n, 2))
    return np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1).astype(np.float32)


def _distinct_logits(rng, shape, skew: float = 3.0) -> np.ndarray:
    """Logits whose sigmoids are all distinct (no ties for torch's unstable sort to order),
    skewed towards low probabilities like a detector's."""
    size = int(np.prod(shape))
    p = ((rng.permutation(size) + 1) / (size + 1)) ** skew
    return np.log(p / (1 - p)).reshape(shape).astype(np.float32)


# ---------------------------------------------------------------- mmyolo's own head

@pytest.fixture(scope="module")
def yolov5_head():
    """Factory of mmyolo YOLOv5Head instances whose decoder returns given boxes."""
    need("mmcv.ops", MM_INSTALL)
    need("mmyolo", MM_INSTALL)
    from mmyolo.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    from mmyolo.models.dense_heads import YOLOv5Head

    def make(num_classes: int, test_cfg: dict):
        from mmengine.config import ConfigDict

        return YOLOv5Head(
            head_module=dict(type="YOLOv5HeadModule", num_classes=num_classes,
                             in_channels=[8, 8, 8], widen_factor=1.0,
                             featmap_strides=[8, 16, 32], num_base_priors=3),
            prior_generator=dict(type="mmdet.YOLOAnchorGenerator",
                                 base_sizes=[[(10, 13), (16, 30), (33, 23)],
                                             [(30, 61), (62, 45), (59, 119)],
                                             [(116, 90), (156, 198), (373, 326)]],
                                 strides=[8, 16, 32]),
            test_cfg=ConfigDict(test_cfg))

    return make


def _run_head(make_head, boxes, cls_logits, obj_logits, test_cfg, meta):
    """mmyolo's predict_by_feat on one image whose decoded boxes are `boxes`; returns its
    InstanceData and the (scores, objectness) after mmyolo's own sigmoid, as numpy."""
    import torch

    n, c = cls_logits.shape
    assert n % 3 == 0
    head = make_head(c, test_cfg)
    per_level = [n // 6, n // 9]
    per_level.append(n // 3 - sum(per_level))
    logits = torch.from_numpy(cls_logits)[None]
    obj = torch.from_numpy(obj_logits)[None] if obj_logits is not None else None
    cls_maps, box_maps, obj_maps, start = [], [], [], 0
    for k in per_level:  # (1, 3C, 1, k) maps that flatten back to rows start..start+3k
        rows = slice(start, start + 3 * k)
        cls_maps.append(logits[:, rows].reshape(1, 1, k, 3 * c).permute(0, 3, 1, 2))
        box_maps.append(torch.zeros(1, 12, 1, k))
        if obj is not None:
            obj_maps.append(obj[:, rows].reshape(1, 1, k, 3).permute(0, 3, 1, 2))
        start += 3 * k
    decoded = torch.from_numpy(boxes)[None]
    head.bbox_coder.decode = lambda priors, preds, strides: decoded.clone()
    with torch.no_grad():
        out = head.predict_by_feat(cls_maps, box_maps, obj_maps if obj is not None else None,
                                   [meta])[0]
        # the very ops predict_by_feat applies, on tensors of the same shape and layout
        scores = torch.cat([logits]).sigmoid()[0].numpy()
        objectness = torch.cat([obj]).sigmoid()[0].numpy() if obj is not None else None
    return out, scores, objectness


def _assert_same_detections(ours: NmsResult, theirs) -> None:
    """Exactly equal float32 boxes, scores and labels. Scores are compared in order; rows of
    equal score may come in either order (torch.sort is unstable), so rows are compared
    after sorting by (score, label, box)."""
    tb = theirs.bboxes.numpy()
    ts = theirs.scores.numpy()
    tl = theirs.labels.numpy()
    assert ours.boxes.dtype == tb.dtype == np.float32
    assert len(ours) == len(ts)
    np.testing.assert_array_equal(ours.scores, ts)

    def rows(b, s, lab):
        return np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], lab, -s))

    o, t = rows(ours.boxes, ours.scores, ours.labels), rows(tb, ts, tl)
    np.testing.assert_array_equal(ours.boxes[o], tb[t])
    np.testing.assert_array_equal(ours.labels[o], tl[t])
    if np.unique(ts).size == ts.size:
        np.testing.assert_array_equal(ours.boxes, tb)
        np.testing.assert_array_equal(ours.labels, tl)


def _plant_cross_class_pair(boxes, cls_logits, obj_logits) -> None:
    """With the case's pad of 300: make box 0 the largest coordinate (700 after the pad) and
    box 2 a copy of box 1 moved down by the class offset 701, all with top scores: in mmcv's
    single NMS box 2's class k+1 then lands on box 1's class k."""
    boxes[0] = [600, 600, 1000, 1000]
    boxes[1] = [650, 650, 720, 720]
    boxes[2] = boxes[1] - np.float32(701)
    c = cls_logits.shape[1]
    cls_logits[:3] = 8 + np.arange(3 * c, dtype=np.float32).reshape(3, c) / 8
    obj_logits[:3] = 8


CASES = {
    # name: (boxes, classes, test_cfg, objectness, pad (left, top), scale (sx, sy))
    "yolov5_multi_label": (2400, 4, dict(multi_label=True, nms_pre=30000, score_thr=0.001,
                                         nms=dict(type="nms", iou_threshold=0.65),
                                         max_per_img=300), True, (0, 80), (1.28, 1.28)),
    "multi_label_split_branch": (4500, 3, dict(multi_label=True, nms_pre=30000, score_thr=0.001,
                                               nms=dict(type="nms", iou_threshold=0.65),
                                               max_per_img=300), True, (12, 0), (0.5, 0.5)),
    "best_class_cuts": (2400, 5, dict(multi_label=False, nms_pre=500, score_thr=0.05,
                                      nms=dict(type="nms", iou_threshold=0.5),
                                      max_per_img=40), True, (0, 0), (1.0, 1.0)),
    "best_class_split_branch": (10500, 2, dict(multi_label=False, nms_pre=30000,
                                               score_thr=0.0001,
                                               nms=dict(type="nms", iou_threshold=0.6),
                                               max_per_img=100), True, (0, 0), (0.8, 0.7)),
    "yolox_style": (1500, 3, dict(multi_label=True, nms_pre=1000, score_thr=0.01,
                                  yolox_style=True, nms=dict(type="nms", iou_threshold=0.65),
                                  max_per_img=10), True, (0, 0), (1.0, 1.0)),
    "one_class_no_objectness": (1200, 1, dict(multi_label=True, nms_pre=30000, score_thr=0.001,
                                              nms=dict(type="nms", iou_threshold=0.7),
                                              max_per_img=300), False, (5, 7), (1.1, 0.9)),
    "min_bbox_size_no_score_thr": (900, 3, dict(multi_label=True, nms_pre=2000,
                                                min_bbox_size=30,
                                                nms=dict(type="nms", iou_threshold=0.65),
                                                max_per_img=300), True, (0, 0), (1.0, 1.0)),
    # a large top pad moves boxes far below -1: mmcv's class offsets no longer separate classes
    "negative_coords_cross_class": (1800, 4, dict(multi_label=True, nms_pre=30000,
                                                  score_thr=0.001,
                                                  nms=dict(type="nms", iou_threshold=0.5),
                                                  max_per_img=300), True, (300, 300),
                                    (1.0, 1.0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_matches_yolov5head_predict_by_feat(yolov5_head, name):
    n, c, cfg, with_obj, pad, scale = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    boxes = _clustered_boxes(rng, n)
    cls_logits = _distinct_logits(rng, (n, c))
    obj_logits = _distinct_logits(rng, (n,), skew=1.0) if with_obj else None
    if name == "negative_coords_cross_class":
        _plant_cross_class_pair(boxes, cls_logits, obj_logits)
    ori_shape = (512, 700)
    meta = dict(ori_shape=ori_shape, scale_factor=scale,
                pad_param=[pad[1], 0, pad[0], 0])
    theirs, scores, objectness = _run_head(yolov5_head, boxes, cls_logits, obj_logits, cfg,
                                           meta)
    ours = mmyolo_nms(boxes, scores, objectness, score_thr=cfg.get("score_thr", -1),
                      nms_pre=cfg["nms_pre"], iou_threshold=cfg["nms"]["iou_threshold"],
                      max_per_img=cfg["max_per_img"], multi_label=cfg["multi_label"],
                      yolox_style=cfg.get("yolox_style", False), pad_left_top=pad,
                      scale_factor=scale, clamp_hw=ori_shape,
                      min_bbox_size=cfg.get("min_bbox_size", -1), trace=True)
    _assert_same_detections(ours, theirs)
    assert_trace_consistent(ours)
    counts = ours.trace.counts()
    assert counts["kept"] > 0 and counts["suppressed"] > 0
    entered_nms = counts["kept"] + counts["suppressed"] + counts["cut_max_detections"]
    if "split_branch" in name:
        assert entered_nms >= MMCV_SPLIT_THR
    else:
        assert entered_nms < MMCV_SPLIT_THR
    if name == "best_class_cuts":
        assert counts["cut_pre_nms_topk"] > 0 and counts["cut_max_detections"] > 0
        boxes_left = n - counts["objectness_filtered"] // c
        assert counts["not_best_class"] == boxes_left * (c - 1)
    if name == "yolox_style":
        assert counts["cut_max_detections"] == 0 and counts["objectness_filtered"] == 0
        assert len(ours) > cfg["max_per_img"]
    if with_obj and not cfg.get("yolox_style") and cfg.get("score_thr", -1) > 0:
        assert counts["objectness_filtered"] > 0
    if name == "min_bbox_size_no_score_thr":
        assert counts["below_min_bbox_size"] > 0 and counts["below_score_threshold"] == 0
    if name == "negative_coords_cross_class":
        tr = ours.trace
        sup = tr.code == FateKind.SUPPRESSED
        cls_idx = np.nonzero(sup)[1]
        assert np.any(tr.by_class[sup] != cls_idx), "expected a cross-class suppression"


def test_iou_exactly_at_threshold_matches_mmcv_and_is_not_suppressed():
    mmcv_ops = need("mmcv.ops", MM_INSTALL)
    import torch

    # class 0: IoU 65 / 100 = 0.65 exactly in float32 (kept at thr 0.65), class 1: IoU 0.66
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 6.5], [20, 0, 30, 10], [20, 0, 30, 6.6],
                      [40, 0, 50, 10], [40, 0, 50, 6.5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
    labels = np.array([0, 0, 1, 1, 2, 3])
    keep, sup = mmcv_batched_nms(boxes, scores, labels, 0.65)
    _, ref = mmcv_ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                  torch.from_numpy(labels), dict(iou_threshold=0.65))
    np.testing.assert_array_equal(keep, ref.numpy())
    np.testing.assert_array_equal(keep, [0, 1, 2, 4, 5])
    assert sup.by[3] == 2 and sup.iou[3] > np.float32(0.65)
    assert sup.by[1] == -1 and np.isnan(sup.iou[1])


@pytest.mark.parametrize("m, negative", [(3000, False), (3000, True),
                                         (MMCV_SPLIT_THR, False), (12000, True)])
def test_mmcv_batched_nms_equals_mmcv_ops(m, negative):
    mmcv_ops = need("mmcv.ops", MM_INSTALL)
    import torch

    rng = np.random.default_rng(m + negative)
    boxes = _clustered_boxes(rng, m, lo=-300.0 if negative else 0.0, hi=640.0)
    if not negative:
        boxes = np.clip(boxes, 0, None)
    scores = ((rng.permutation(m) + 1) / (m + 1)).astype(np.float32)
    labels = rng.integers(0, 6, m)
    if negative:
        # copies of boxes 100..109 moved down by one class offset into the next class: in
        # mmcv's single NMS they land on their originals
        shift = boxes.max() + np.float32(1)
        boxes[110:120] = boxes[100:110] - shift
        labels[110:120] = labels[100:110] + 1
    # integer copies of some boxes at exactly representable IoUs with their originals
    boxes[:50] = np.round(boxes[:50])
    boxes[50:100] = boxes[:50]
    boxes[50:100, 3] = boxes[:50, 1] + np.round((boxes[:50, 3] - boxes[:50, 1]) * 0.65)
    labels[50:100] = labels[:50]
    keep, sup = mmcv_batched_nms(boxes, scores, labels, 0.65)
    dets, ref = mmcv_ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                     torch.from_numpy(labels), dict(iou_threshold=0.65))
    np.testing.assert_array_equal(keep, ref.numpy())
    np.testing.assert_array_equal(scores[keep], dets[:, -1].numpy())
    assert 0 < keep.size < m
    cross = sup.by >= 0
    crossed = np.any(labels[sup.by[cross]] != labels[cross])
    # classes interact only in the single-NMS branch with coordinates below -1
    assert crossed == (negative and m < MMCV_SPLIT_THR)


def _simple(n_cls: int = 2):
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 2, 2]],
                     np.float32)
    scores = np.array([[0.9, 0.1], [0.8, 0.85], [0.3, 0.6], [0.0005, 0.7]],
                      np.float32)[:, :n_cls]
    return boxes, scores


def test_objectness_filter_and_multiplication():
    boxes, scores = _simple()
    obj = np.array([1.0, 0.5, 0.001, 0.9], np.float32)
    r = mmyolo_nms(boxes, scores, obj, score_thr=0.001, iou_threshold=0.5, max_per_img=10,
                   multi_label=True, trace=True)
    assert_trace_consistent(r)
    tr = r.trace
    # objectness 0.001 is not > 0.001: both classes of box 2 go before anything else
    assert tr.fate(2, 0).kind == tr.fate(2, 1).kind == FateKind.OBJECTNESS_FILTERED
    assert str(tr.fate(2, 1)) == "objectness 0.001 <= threshold 0.001"
    np.testing.assert_array_equal(r.scores, np.float32([0.9, 0.7 * 0.9, 0.85 * 0.5]))
    # box 3 class 0: 0.0005 * 0.9 is below score_thr after the multiplication
    assert tr.fate(3, 0).kind == FateKind.BELOW_SCORE_THRESHOLD
    # box 1 class 0 overlaps box 0 class 0
    fate = tr.fate(1, 0)
    assert fate.kind == FateKind.SUPPRESSED and (fate.by_box, fate.by_class) == (0, 0)
    # yolox_style: no objectness filter, still multiplied
    y = mmyolo_nms(boxes, scores, obj, score_thr=0.0001, iou_threshold=0.5, max_per_img=1,
                   multi_label=True, yolox_style=True, trace=True)
    assert y.trace.counts()["objectness_filtered"] == 0 and len(y) > 1


def test_best_class_only_without_multi_label():
    boxes, scores = _simple()
    r = mmyolo_nms(boxes, scores, score_thr=0.001, iou_threshold=0.5, max_per_img=10,
                   multi_label=False, trace=True)
    assert_trace_consistent(r)
    np.testing.assert_array_equal(r.labels, [0, 1, 1, 1])
    np.testing.assert_array_equal(r.box_index, [0, 1, 3, 2])
    fate = r.trace.fate(1, 0)
    assert fate.kind == FateKind.NOT_BEST_CLASS and fate.by_class == 1
    assert str(fate) == "not the box's best class (best is class 1)"
    # multi_label with one class is switched off: no not_best_class, same as multi_label=False
    b1, s1 = _simple(1)
    one = mmyolo_nms(b1, s1, score_thr=0.001, iou_threshold=0.5, max_per_img=10,
                     multi_label=True, trace=True)
    assert one.trace.counts()["not_best_class"] == 0 and len(one) == 2


def test_nms_pre_and_max_per_img_cuts_are_traced_with_ranks():
    boxes = (np.arange(8)[:, None] * 30 + np.array([0, 0, 10, 10])).astype(np.float32)
    scores = np.linspace(0.9, 0.2, 8, dtype=np.float32)[:, None]
    r = mmyolo_nms(boxes, scores, score_thr=0.1, nms_pre=5, iou_threshold=0.5, max_per_img=3,
                   multi_label=False, trace=True)
    assert_trace_consistent(r)
    np.testing.assert_array_equal(r.box_index, [0, 1, 2])
    tr = r.trace
    assert [tr.fate(i, 0).rank for i in (5, 6, 7)] == [5, 6, 7]
    assert str(tr.fate(5, 0)) == "cut by pre-NMS top-k: rank 5 >= k = 5"
    assert str(tr.fate(4, 0)) == "cut by max detections: rank 4 >= k = 3"
    assert str(tr.fate(0, 0)) == "kept (output row 0)"


def test_rescale_before_nms_and_clamp_after():
    boxes = np.array([[-20, 10, 100, 50], [300, 200, 420, 330]], np.float32)
    scores = np.array([[0.9], [0.8]], np.float32)
    r = mmyolo_nms(boxes, scores, score_thr=0.01, iou_threshold=0.5, max_per_img=10,
                   multi_label=False, pad_left_top=(10, 20), scale_factor=(2.0, 0.5),
                   clamp_hw=(400, 200))
    expected = (boxes - np.float32([10, 20, 10, 20])) / np.float32([2, 0.5, 2, 0.5])
    expected[:, 0::2] = np.clip(expected[:, 0::2], 0, 200)
    expected[:, 1::2] = np.clip(expected[:, 1::2], 0, 400)
    np.testing.assert_array_equal(r.boxes, expected)
    # NMS sees the unclamped boxes: IoU 100 / 600 here, so both survive and then clamp to
    # the same box
    pair = np.array([[-50, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    two = np.array([[0.9], [0.8]], np.float32)
    both = mmyolo_nms(pair, two, score_thr=0.01, iou_threshold=0.5, max_per_img=10,
                      multi_label=False, clamp_hw=(100, 100))
    np.testing.assert_array_equal(both.boxes, [[0, 0, 10, 10], [0, 0, 10, 10]])


def test_tie_order_decides_between_equal_scores():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([[0.5], [0.5]], np.float32)
    kw = dict(score_thr=0.1, iou_threshold=0.5, max_per_img=10, multi_label=False)
    np.testing.assert_array_equal(mmyolo_nms(boxes, scores, **kw).box_index, [0])
    np.testing.assert_array_equal(mmyolo_nms(boxes, scores, tie_order="reverse", **kw).box_index,
                                  [1])


def test_trace_of_a_full_size_image_is_light_and_complete():
    rng = np.random.default_rng(7)
    n, c = 8400, 80
    boxes = _clustered_boxes(rng, n)
    scores = (rng.random((n, c), dtype=np.float32) ** 40).astype(np.float32)
    r = mmyolo_nms(boxes, scores, None, score_thr=0.001, nms_pre=30000, iou_threshold=0.65,
                   max_per_img=300, multi_label=True, trace=True)
    tr = r.trace
    size = sum(getattr(tr, f).nbytes for f in ("code", "rank", "limit", "by_box", "by_class",
                                                "iou", "threshold", "inclusive", "score"))
    assert size <= 30 * n * c  # about 20 MB
    assert_trace_consistent(r)
    assert tr.counts()["kept"] == 300 and tr.counts()["cut_max_detections"] > 0
    # a readable fate for every kind that occurred
    for kind in FateKind:
        where = np.argwhere(tr.code == kind)
        if where.size:
            assert str(tr.fate(*where[0]))


def test_matrix_and_list_greedy_paths_agree(monkeypatch):
    import harness.nms.greedy as greedy

    rng = np.random.default_rng(11)
    boxes = _clustered_boxes(rng, 400)
    scores = ((rng.permutation(400) + 1) / 401).astype(np.float32)
    labels = rng.integers(0, 3, 400)
    keep_matrix, sup_matrix = mmcv_batched_nms(boxes, scores, labels, 0.5)
    monkeypatch.setattr(greedy, "_MATRIX_MAX", 0)
    keep_list, sup_list = mmcv_batched_nms(boxes, scores, labels, 0.5)
    np.testing.assert_array_equal(keep_matrix, keep_list)
    np.testing.assert_array_equal(sup_matrix.by, sup_list.by)
    np.testing.assert_array_equal(sup_matrix.iou, sup_list.iou)
    assert np.count_nonzero(sup_list.by >= 0) > 50


@pytest.mark.parametrize("cells", [1 << 20, 5000])
@pytest.mark.parametrize("inclusive", [False, True])
def test_a_large_group_in_blocks_is_the_greedy_one_at_a_time(monkeypatch, cells, inclusive):
    """Groups above _MATRIX_MAX go a block at a time (the block's own matrix, then the rest
    against its kept boxes): the same kept boxes, suppressors and IoUs as one box at a time,
    with blocks of every size _CELLS allows, ties, duplicates and empty boxes among them."""
    import harness.nms.greedy as greedy
    from harness.nms.greedy import greedy_suppress
    from harness.nms.mmyolo import _mmcv_iou

    rng = np.random.default_rng(5)
    n = 3000
    boxes = _clustered_boxes(rng, n)
    boxes[::97] = boxes[1::97]  # duplicates: IoU 1
    boxes[::131, 2] = boxes[::131, 0]  # empty: IoU 0, nan against another empty one
    scores = np.round(rng.random(n), 2).astype(np.float32)  # many ties
    order = np.argsort(-scores, kind="stable")
    iou = _mmcv_iou(boxes)
    monkeypatch.setattr(greedy, "_CELLS", cells)
    blocks = greedy_suppress(order, n, iou, 0.5, inclusive)
    monkeypatch.setattr(greedy, "_MATRIX_MAX", 0)  # one box at a time
    single = greedy_suppress(order, n, iou, 0.5, inclusive)
    np.testing.assert_array_equal(blocks.kept, single.kept)
    np.testing.assert_array_equal(blocks.by, single.by)
    np.testing.assert_array_equal(blocks.iou, single.iou)
    assert 100 < np.count_nonzero(single.by >= 0) < n - 100
