"""EfficientNMS_TRT reference: hand-built cases that pin each behaviour docs/nms-semantics.md
documents (>= tests, the global cap and its trace ranks, one class-mixed order, zero padding, logit-space
thresholds, box coding, class-agnostic mode, the dense path's sentinels, tie order)."""
from __future__ import annotations

import numpy as np
import pytest

from harness.nms import EFFICIENT_NMS_CAP, efficient_nms_trt, logit_threshold
from harness.nms import onnx_non_max_suppression
from harness.nms.trace import FateKind
from tests.nms.conftest import assert_trace_consistent


def _grid_boxes(n: int) -> np.ndarray:
    """n pairwise-disjoint 10x10 boxes (no suppression among them), (N, 4) xyxy."""
    x = (np.arange(n) * 20).astype(np.float32)
    return np.stack([x, np.zeros(n), x + 10, np.full(n, 10)], axis=1).astype(np.float32)


def _run(boxes, scores, **kw):
    kw.setdefault("score_threshold", 0.1)
    kw.setdefault("iou_threshold", 0.5)
    kw.setdefault("max_output_boxes", 10)
    return efficient_nms_trt(boxes[None], scores[None], trace=True, **kw)


def test_score_exactly_at_threshold_is_kept():
    boxes = _grid_boxes(3)
    scores = np.array([[0.25], [0.2499999], [0.9]], np.float32)
    out = _run(boxes, scores, score_threshold=0.25)
    np.testing.assert_array_equal(out.detection_indices[0, :2], [2, 0])
    assert out.num_detections[0, 0] == 2
    fate = out.results[0].trace.fate(1, 0)
    assert fate.kind == FateKind.BELOW_SCORE_THRESHOLD and fate.inclusive
    assert str(fate) == "score 0.2499999 < threshold 0.25"
    # the ONNX op (strict >) drops the 0.25 that EfficientNMS keeps
    onnx = onnx_non_max_suppression(boxes[None], scores.T[None], 10, 0.5, 0.25)
    np.testing.assert_array_equal(onnx.selected_indices[:, 2], [2])


def test_iou_exactly_at_threshold_is_suppressed():
    # intersection 50, union 100: IoU exactly 0.5 in float32
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32)
    scores = np.array([[0.9], [0.8]], np.float32)
    out = _run(boxes, scores, iou_threshold=0.5)
    assert out.num_detections[0, 0] == 1
    fate = out.results[0].trace.fate(1, 0)
    assert fate.kind == FateKind.SUPPRESSED and fate.by_box == 0 and fate.iou == 0.5
    assert str(fate) == "suppressed by box 0 (class 0) at IoU 0.500 >= 0.500"
    assert_trace_consistent(out.results[0])
    # the ONNX op keeps both at the same threshold
    onnx = onnx_non_max_suppression(boxes[None], scores.T[None], 10, 0.5)
    assert len(onnx.selected_indices) == 2


def test_cap_cuts_candidates_before_nms_with_their_ranks():
    n, c = 6, 2
    boxes = _grid_boxes(n)
    # 12 distinct scores, class-mixed: rank r has score 0.95 - 0.05 r
    ranks = np.arange(n * c).reshape(n, c)[::-1]
    scores = (0.95 - 0.05 * ranks).astype(np.float32)
    out = _run(boxes, scores, cap=5, max_output_boxes=20)
    r = out.results[0]
    assert_trace_consistent(r)
    assert out.num_detections[0, 0] == 5
    np.testing.assert_allclose(r.scores, 0.95 - 0.05 * np.arange(5), rtol=1e-6)
    tr = r.trace
    cut = tr.code == FateKind.CUT_PRE_NMS_TOPK
    np.testing.assert_array_equal(tr.rank[cut], ranks[cut])  # rank in the one sorted order
    assert np.all(ranks[cut] >= 5) and np.all(tr.limit[cut] == 5)
    assert str(tr.fate(0, 1)) == "cut by pre-NMS top-k: rank 11 >= k = 5"
    # the default cap is TensorRT >= 8.5.1's 5000
    assert EFFICIENT_NMS_CAP == 5000


def test_cap_is_one_for_all_classes_unlike_batched_nms_per_class_topk():
    boxes = _grid_boxes(4)
    # class 1 has the 3 best scores; a global cap of 3 leaves class 0 nothing
    scores = np.array([[0.5, 0.9], [0.4, 0.8], [0.3, 0.7], [0.2, 0.1]], np.float32)
    out = _run(boxes, scores, cap=3)
    np.testing.assert_array_equal(out.detection_classes[0, :3], [1, 1, 1])
    assert out.num_detections[0, 0] == 3


def test_output_is_one_class_mixed_ranking_with_zero_padding():
    boxes = _grid_boxes(4)
    scores = np.array([[0.9, 0.2], [0.3, 0.8], [0.7, 0.6], [0.15, 0.05]], np.float32)
    out = _run(boxes, scores, max_output_boxes=8)
    m = out.num_detections[0, 0]
    assert m == 7
    np.testing.assert_allclose(out.detection_scores[0, :m],
                               [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.15])
    np.testing.assert_array_equal(out.detection_classes[0, :m], [0, 1, 0, 1, 0, 1, 0])
    assert out.detection_classes.dtype == np.int32 and out.num_detections.dtype == np.int32
    # padding past num_detections is zero, class 0 included
    assert np.all(out.detection_scores[0, m:] == 0) and np.all(out.detection_classes[0, m:] == 0)
    assert np.all(out.detection_boxes[0, m:] == 0)
    assert out.detection_boxes.shape == (1, 8, 4)


def test_max_output_boxes_cuts_survivors_in_order():
    boxes = _grid_boxes(5)
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]], np.float32)
    out = _run(boxes, scores, max_output_boxes=2)
    np.testing.assert_array_equal(out.detection_indices[0], [0, 1])
    tr = out.results[0].trace
    assert_trace_consistent(out.results[0])
    assert [tr.fate(i, 0).rank for i in (2, 3, 4)] == [2, 3, 4]
    assert str(tr.fate(4, 0)) == "cut by max detections: rank 4 >= k = 2"


def test_background_class_is_ignored():
    boxes = _grid_boxes(2)
    scores = np.array([[0.9, 0.3], [0.8, 0.4]], np.float32)
    out = _run(boxes, scores, background_class=0)
    np.testing.assert_array_equal(out.detection_classes[0, :2], [1, 1])
    assert out.results[0].trace.fate(0, 0).kind == FateKind.BACKGROUND_CLASS


def test_score_activation_thresholds_in_logit_space_and_outputs_sigmoid():
    thr = 0.25
    lt = logit_threshold(thr)
    assert lt == np.float32(np.log(np.float32(thr) / (np.float32(1) - np.float32(thr))))
    below = np.nextafter(lt, np.float32(-np.inf))
    boxes = _grid_boxes(3)
    logits = np.array([[lt], [below], [2.0]], np.float32)
    out = _run(boxes, logits, score_threshold=thr, score_activation=True)
    np.testing.assert_array_equal(out.detection_indices[0, :2], [2, 0])
    assert out.num_detections[0, 0] == 2
    # scores are sigmoid(logit); the threshold fate is in logit space
    np.testing.assert_allclose(out.detection_scores[0, :2], [1 / (1 + np.exp(-2.0)), 0.25],
                               rtol=1e-6)
    fate = out.results[0].trace.fate(1, 0)
    assert fate.kind == FateKind.BELOW_SCORE_THRESHOLD and fate.threshold == lt
    # logit space, not probability space: at threshold 0.5 (logit 0), the largest negative
    # float32 logit is dropped although its sigmoid rounds to exactly 0.5
    tiny = np.nextafter(np.float32(0), np.float32(-1))
    assert np.float32(1 / (1 + np.exp(-np.float64(tiny)))) == np.float32(0.5)
    half = _run(boxes, np.array([[0.0], [tiny], [-1.0]], np.float32), score_threshold=0.5,
                score_activation=True)
    np.testing.assert_array_equal(half.detection_indices[0, :2], [0, -1])


def test_score_activation_zero_threshold_keeps_every_logit():
    boxes = _grid_boxes(2)
    logits = np.array([[-30.0], [-1000.0]], np.float32)
    out = _run(boxes, logits, score_threshold=0.0, score_activation=True)
    assert out.num_detections[0, 0] == 2


def test_box_coding_centre_size_outputs_corners():
    boxes = np.array([[5, 5, 10, 4], [40, 5, 2, 2]], np.float32)  # x, y, w, h
    scores = np.array([[0.9], [0.8]], np.float32)
    out = _run(boxes, scores, box_coding=1)
    np.testing.assert_array_equal(out.detection_boxes[0, :2], [[0, 3, 10, 7], [39, 4, 41, 6]])


def test_corners_in_either_order_same_iou_and_output_keeps_input_order():
    boxes = np.array([[0, 0, 10, 10], [10, 5, 0, 0]], np.float32)  # 2nd: reversed corners
    scores = np.array([[0.9], [0.8]], np.float32)
    kept = _run(boxes, scores, iou_threshold=0.51)
    np.testing.assert_array_equal(kept.detection_boxes[0, 1], [10, 5, 0, 0])
    gone = _run(boxes, scores, iou_threshold=0.5)
    assert gone.num_detections[0, 0] == 1


def test_class_agnostic_suppresses_across_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], np.float32)
    scores = np.array([[0.9, 0.0], [0.0, 0.8]], np.float32)
    per_class = _run(boxes, scores)
    assert per_class.num_detections[0, 0] == 2
    agnostic = _run(boxes, scores, class_agnostic=True)
    assert agnostic.num_detections[0, 0] == 1
    fate = agnostic.results[0].trace.fate(1, 1)
    assert fate.kind == FateKind.SUPPRESSED and (fate.by_box, fate.by_class) == (0, 0)


def test_per_class_boxes_input():
    # (N, C, 4): class 1 of box 1 overlaps class 1 of box 0; class 0 boxes are apart
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 10]], [[50, 0, 60, 10], [0, 0, 10, 9]]],
                     np.float32)
    scores = np.array([[0.9, 0.7], [0.8, 0.6]], np.float32)
    out = _run(boxes, scores)
    np.testing.assert_array_equal(out.detection_indices[0, :3], [0, 1, 0])
    np.testing.assert_array_equal(out.detection_classes[0, :3], [0, 0, 1])
    assert out.results[0].trace.fate(1, 1).kind == FateKind.SUPPRESSED


def test_dense_path_sentinels_reach_the_output_only_when_modelled():
    boxes = _grid_boxes(3)
    scores = np.array([[0.5], [0.0001], [0.0]], np.float32)
    plain = _run(boxes, scores, score_threshold=0.001)
    assert plain.num_detections[0, 0] == 1
    dense = _run(boxes, scores, score_threshold=0.001, dense_sentinels=True)
    assert dense.num_detections[0, 0] == 3
    np.testing.assert_array_equal(dense.detection_scores[0, :3], [0.5, -32768, -32768])
    assert_trace_consistent(dense.results[0])
    # above 0.007 the filter path runs: no sentinels even when modelled
    filt = _run(boxes, scores, score_threshold=0.01, dense_sentinels=True)
    assert filt.num_detections[0, 0] == 1


def test_tie_order_decides_which_of_two_equal_boxes_survives():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([[0.5], [0.5]], np.float32)
    assert _run(boxes, scores).detection_indices[0, 0] == 0
    assert _run(boxes, scores, tie_order="reverse").detection_indices[0, 0] == 1


def test_batches_are_independent():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (2, 50, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 20], axis=-1)
    scores = rng.random((2, 50, 3)).astype(np.float32)
    both = efficient_nms_trt(boxes, scores, score_threshold=0.2, iou_threshold=0.5,
                             max_output_boxes=30)
    for b in range(2):
        one = efficient_nms_trt(boxes[b:b + 1], scores[b:b + 1], score_threshold=0.2,
                                iou_threshold=0.5, max_output_boxes=30)
        np.testing.assert_array_equal(both.detection_boxes[b], one.detection_boxes[0])
        np.testing.assert_array_equal(both.detection_scores[b], one.detection_scores[0])
    assert 0 < both.num_detections[0, 0] <= 30


def test_random_trace_invariants():
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 200, (1, 300, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (1, 300, 2))], axis=-1)
    scores = rng.random((1, 300, 5)).astype(np.float32)
    out = efficient_nms_trt(boxes.astype(np.float32), scores, score_threshold=0.3,
                            iou_threshold=0.45, max_output_boxes=50, cap=400,
                            background_class=4, trace=True)
    r = out.results[0]
    assert_trace_consistent(r)
    counts = r.trace.counts()
    for kind in ("kept", "below_score_threshold", "cut_pre_nms_topk", "suppressed",
                 "cut_max_detections", "background_class"):
        assert counts[kind] > 0, kind
    # the output is the trace's kept candidates, scores descending
    assert np.all(np.diff(r.scores) <= 0) and len(r) == 50


def test_rejects_what_the_plugin_rejects():
    boxes, scores = _grid_boxes(1)[None], np.ones((1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="score_threshold"):
        efficient_nms_trt(boxes, scores, score_threshold=-0.1, iou_threshold=0.5,
                          max_output_boxes=1)
    with pytest.raises(ValueError, match="iou_threshold"):
        efficient_nms_trt(boxes, scores, score_threshold=0.1, iou_threshold=0.0,
                          max_output_boxes=1)
