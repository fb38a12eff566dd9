"""BatchedNMS_TRT / BatchedNMSDynamic_TRT reference: hand-built cases that pin each documented
behaviour (strict tests, per-class topK, Caffe's +1 px, keepTopK across classes, -1 / 0
padding, clipping, the silent empty output when keepTopK > topK)."""
from __future__ import annotations

import numpy as np
import pytest

from harness.nms import batched_nms_trt, efficient_nms_trt
from harness.nms.trace import FateKind
from tests.nms.conftest import assert_trace_consistent


def _grid_boxes(n: int) -> np.ndarray:
    x = (np.arange(n) * 20).astype(np.float32)
    return np.stack([x, np.zeros(n), x + 10, np.full(n, 10)], axis=1).astype(np.float32)


def _run(boxes, scores, **kw):
    for key, value in dict(top_k=100, keep_top_k=10, score_threshold=0.1, iou_threshold=0.5,
                           is_normalized=False, clip_boxes=False).items():
        kw.setdefault(key, value)
    return batched_nms_trt(boxes[None], scores[None], trace=True, **kw)


def test_score_exactly_at_threshold_is_dropped():
    boxes = _grid_boxes(2)
    scores = np.array([[0.25], [0.5]], np.float32)
    out = _run(boxes, scores, score_threshold=0.25)
    assert out.num_detections[0, 0] == 1
    fate = out.results[0].trace.fate(0, 0)
    assert fate.kind == FateKind.BELOW_SCORE_THRESHOLD and not fate.inclusive


def test_plus_one_pixel_iou_when_not_normalized():
    # 10 x 10 and 10 x 5 pixel boxes written inclusively: [0, 9] and [0, 4]
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 4]], np.float32)
    scores = np.array([[0.9], [0.8]], np.float32)
    # caffe: inter (9+1)(4+1) = 50, areas 100 and 50 -> IoU 0.5, suppressed above 0.49
    caffe = _run(boxes, scores, iou_threshold=0.49)
    assert caffe.num_detections[0, 0] == 1
    fate = caffe.results[0].trace.fate(1, 0)
    assert fate.kind == FateKind.SUPPRESSED and fate.iou == np.float32(0.5)
    # exactly at the threshold: strict >, kept
    assert _run(boxes, scores, iou_threshold=0.5).num_detections[0, 0] == 2
    # normalized (no +1 anywhere): 36 / 81 = 0.444, kept at 0.49
    plain = _run(boxes, scores, iou_threshold=0.49, is_normalized=True)
    assert plain.num_detections[0, 0] == 2
    # caffeSemantics off: areas still get +1, the intersection does not: 36 / 114
    no_caffe = _run(boxes, scores, iou_threshold=0.3, caffe_semantics=False)
    assert no_caffe.num_detections[0, 0] == 1
    assert no_caffe.results[0].trace.fate(1, 0).iou == np.float32(36 / 114)


def test_caffe_semantics_make_disjoint_boxes_overlap_by_one_pixel():
    # far apart: intersectBbox returns [0, 0, 0, 0], which +1 turns into a 1 x 1 overlap
    boxes = np.array([[0, 0, 1, 1], [100, 100, 101, 101]], np.float32)
    scores = np.array([[0.9], [0.8]], np.float32)
    out = _run(boxes, scores, iou_threshold=0.1)
    assert out.num_detections[0, 0] == 1
    assert out.results[0].trace.fate(1, 0).iou == np.float32(1 / 7)  # 1 / (4 + 4 - 1)
    # EfficientNMS sees no overlap at all
    eff = efficient_nms_trt(boxes[None], scores[None], score_threshold=0.1, iou_threshold=0.1,
                            max_output_boxes=10)
    assert eff.num_detections[0, 0] == 2


def test_per_class_top_k_cuts_before_nms_with_ranks():
    boxes = _grid_boxes(6)
    scores = np.stack([np.linspace(0.9, 0.4, 6), np.linspace(0.85, 0.35, 6)], 1)
    out = _run(boxes, scores.astype(np.float32), top_k=4, keep_top_k=4)
    r = out.results[0]
    assert_trace_consistent(r)
    tr = r.trace
    for cls in (0, 1):  # each class keeps its own 4 best, then 4 of those 8 survive keepTopK
        assert [tr.fate(b, cls).kind for b in (4, 5)] == [FateKind.CUT_PRE_NMS_TOPK] * 2
        assert [tr.fate(b, cls).rank for b in (4, 5)] == [4, 5]
    np.testing.assert_array_equal(out.nmsed_classes[0], [0, 1, 0, 1])
    cut = tr.code == FateKind.CUT_MAX_DETECTIONS
    assert np.count_nonzero(cut) == 4 and np.all(tr.rank[cut] >= 4)


def test_keep_top_k_across_classes_with_invalid_rows_padded():
    boxes = _grid_boxes(3)
    scores = np.array([[0.9, 0.2], [0.05, 0.8], [0.7, 0.01]], np.float32)
    out = _run(boxes, scores, keep_top_k=6)
    m = out.num_detections[0, 0]
    assert m == 4
    np.testing.assert_allclose(out.nmsed_scores[0], [0.9, 0.8, 0.7, 0.2, 0, 0])
    np.testing.assert_array_equal(out.nmsed_classes[0], [0, 1, 0, 1, -1, -1])
    assert out.nmsed_classes.dtype == np.float32
    assert np.all(out.nmsed_boxes[0, m:] == 0)


def test_keep_top_k_larger_than_top_k_gives_a_silent_empty_output():
    boxes = _grid_boxes(3)
    scores = np.array([[0.9], [0.8], [0.7]], np.float32)
    out = _run(boxes, scores, top_k=2, keep_top_k=3)
    assert out.num_detections[0, 0] == 0
    assert np.all(out.nmsed_classes == -1) and np.all(out.nmsed_scores == 0)
    r = out.results[0]
    assert len(r) == 0
    assert_trace_consistent(r)
    fate = r.trace.fate(0, 0)
    assert fate.kind == FateKind.CUT_MAX_DETECTIONS and fate.limit == 0
    # keepTopK == topK is fine
    assert _run(boxes, scores, top_k=3, keep_top_k=3).num_detections[0, 0] == 3


def test_clip_boxes_clamps_to_unit_range_even_in_pixels():
    boxes = np.array([[-0.5, 0.2, 0.7, 1.5], [5, 5, 30, 30]], np.float32)
    scores = np.array([[0.9], [0.8]], np.float32)
    out = _run(boxes, scores, clip_boxes=True)
    np.testing.assert_array_equal(out.nmsed_boxes[0, :2],
                                  np.float32([[0, 0.2, 0.7, 1], [1, 1, 1, 1]]))
    raw = _run(boxes, scores, clip_boxes=False)
    np.testing.assert_array_equal(raw.nmsed_boxes[0, :2], boxes)


def test_background_label_and_per_class_boxes():
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]],
                      [[0, 0, 10, 10], [50, 0, 60, 10], [0, 0, 10, 9]]], np.float32)
    scores = np.array([[0.99, 0.9, 0.7], [0.99, 0.8, 0.6]], np.float32)
    out = _run(boxes, scores, share_location=False, background_label_id=0)
    # class 0 ignored; class 1 boxes apart (both kept); class 2 boxes overlap (one kept)
    assert out.num_detections[0, 0] == 3
    np.testing.assert_array_equal(out.nmsed_classes[0, :3], [1, 1, 2])
    np.testing.assert_array_equal(out.nmsed_boxes[0, 1], [50, 0, 60, 10])
    tr = out.results[0].trace
    assert tr.fate(0, 0).kind == FateKind.BACKGROUND_CLASS
    assert tr.fate(1, 2).kind == FateKind.SUPPRESSED
    assert_trace_consistent(out.results[0])


def test_rejects_top_k_above_4096():
    with pytest.raises(ValueError, match="4096"):
        _run(_grid_boxes(1), np.ones((1, 1), np.float32), top_k=4097)


def test_random_trace_invariants():
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 300, (2, 400, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (2, 400, 2))], axis=-1).astype(np.float32)
    scores = rng.random((2, 400, 4)).astype(np.float32)
    out = batched_nms_trt(boxes, scores, top_k=150, keep_top_k=100, score_threshold=0.4,
                          iou_threshold=0.5, is_normalized=False, clip_boxes=False,
                          background_label_id=3, trace=True)
    for b, r in enumerate(out.results):
        assert_trace_consistent(r)
        counts = r.trace.counts()
        for kind in ("kept", "below_score_threshold", "cut_pre_nms_topk", "suppressed",
                     "cut_max_detections", "background_class"):
            assert counts[kind] > 0, kind
        assert len(r) == out.num_detections[b, 0] == 100
        np.testing.assert_array_equal(r.scores, out.nmsed_scores[b])


def test_tie_order_within_and_across_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 0, 60, 10]], np.float32)
    scores = np.array([[0.5, 0.0], [0.5, 0.0], [0.0, 0.5]], np.float32)
    stable = _run(boxes, scores)
    np.testing.assert_array_equal(stable.nmsed_indices[0, :2], [0, 2])  # box 0, then class 1
    np.testing.assert_array_equal(stable.nmsed_classes[0, :2], [0, 1])
    reverse = _run(boxes, scores, tie_order="reverse")
    np.testing.assert_array_equal(reverse.nmsed_indices[0, :2], [2, 1])
    np.testing.assert_array_equal(reverse.nmsed_classes[0, :2], [1, 0])
