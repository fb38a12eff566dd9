"""The ONNX NonMaxSuppression reference == onnxruntime's own CPU kernel, bit for bit, on random
cases built to hit every edge (ties, IoU and score exactly at the thresholds, corners in either
order, zero-area boxes), plus the TensorRT INMSLayer flavour's documented differences."""
from __future__ import annotations

import numpy as np
import pytest

from harness.nms.onnx_nms import _box_info, _ort_iou, onnx_non_max_suppression
from harness.nms.trace import FateKind
from tests.nms.conftest import assert_trace_consistent, need

NUM_RANDOM_CASES = 1200


def _session(center_point_box: int, with_score_threshold: bool):
    """A one-node NonMaxSuppression model (opset 11) run by onnxruntime on CPU."""
    onnx = need("onnx", "pip install onnx")
    ort = need("onnxruntime", "pip install onnxruntime")
    from onnx import TensorProto, helper

    names = ["boxes", "scores", "max_output_boxes_per_class", "iou_threshold"]
    inputs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["B", "N", 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "C", "N"]),
        helper.make_tensor_value_info("max_output_boxes_per_class", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("iou_threshold", TensorProto.FLOAT, [1]),
    ]
    if with_score_threshold:
        names.append("score_threshold")
        inputs.append(helper.make_tensor_value_info("score_threshold", TensorProto.FLOAT, [1]))
    node = helper.make_node("NonMaxSuppression", names, ["selected"],
                            center_point_box=center_point_box)
    out = helper.make_tensor_value_info("selected", TensorProto.INT64, ["K", 3])
    graph = helper.make_graph([node], "nms", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions():
    return {(cpb, st): _session(cpb, st) for cpb in (0, 1) for st in (False, True)}


def _random_case(rng: np.random.Generator) -> dict:
    """Boxes on a coarse grid (so IoUs repeat and hit round thresholds exactly), few distinct
    scores (ties), thresholds drawn from values that occur in the case."""
    b = int(rng.integers(1, 4))
    n = int(rng.choice([0, 1, 2, 3, 5, 8, 13, 20, 30]))
    c = int(rng.integers(1, 5))
    cpb = int(rng.integers(0, 2))
    if cpb == 0:
        a = rng.integers(0, 12, (b, n, 2)).astype(np.float32)
        size = rng.integers(0, 7, (b, n, 2)).astype(np.float32)  # 0: zero-area boxes
        if rng.random() < 0.5:
            size += rng.choice([0.0, 0.5], (b, n, 2)).astype(np.float32)
        far = a + size
        swap = rng.random((b, n, 2)) < 0.5  # corners in either order
        p = np.where(swap, far, a)
        q = np.where(swap, a, far)
        boxes = np.stack([p[..., 0], p[..., 1], q[..., 0], q[..., 1]], axis=-1)
    else:
        centre = rng.integers(0, 12, (b, n, 2)).astype(np.float32)
        centre += rng.choice([0.0, 0.5], (b, n, 2)).astype(np.float32)
        size = rng.integers(0, 8, (b, n, 2)).astype(np.float32)
        size *= np.where(rng.random((b, n, 2)) < 0.05, -1, 1).astype(np.float32)
        boxes = np.concatenate([centre, size], axis=-1)
    boxes = boxes.astype(np.float32)
    levels = rng.choice([2, 4, 1000])
    scores = (rng.integers(1, levels + 1, (b, c, n)) / levels).astype(np.float32)
    # iou threshold: a round value, or exactly the IoU of two boxes of the case
    iou = float(rng.choice([0.0, 0.25, 1 / 3, 0.5, 0.65, 0.7, 1.0]))
    if n >= 2 and rng.random() < 0.4:
        info = _box_info(boxes[0], cpb)
        i, j = rng.choice(n, 2, replace=False)
        exact = float(_ort_iou(info)(int(i), np.array([j]))[0])
        if 0.0 <= exact <= 1.0:
            iou = exact
    score_thr = None
    if rng.random() < 0.7:
        score_thr = float(rng.choice(scores.ravel())) if scores.size and rng.random() < 0.6 \
            else float(rng.choice([0.0, 0.3, 0.5, 0.99]))
    max_out = int(rng.choice([-1, 0, 1, 2, 3, 5, 100]))
    return dict(boxes=boxes, scores=scores, max_out=max_out, iou=iou, score_thr=score_thr,
                cpb=cpb)


def _run_ort(sessions, case) -> np.ndarray:
    feeds = {"boxes": case["boxes"], "scores": case["scores"],
             "max_output_boxes_per_class": np.array([case["max_out"]], np.int64),
             "iou_threshold": np.array([case["iou"]], np.float32)}
    with_thr = case["score_thr"] is not None
    if with_thr:
        feeds["score_threshold"] = np.array([case["score_thr"]], np.float32)
    return sessions[(case["cpb"], with_thr)].run(None, feeds)[0]


def test_equals_onnxruntime_on_random_cases(sessions):
    rng = np.random.default_rng(20240611)
    hit = {"exact_iou_kept": 0, "ties": 0, "score_at_threshold": 0, "zero_area": 0,
           "reversed": 0, "selected": 0}
    for k in range(NUM_RANDOM_CASES):
        case = _random_case(rng)
        expected = _run_ort(sessions, case)
        ours = onnx_non_max_suppression(case["boxes"], case["scores"], case["max_out"],
                                        case["iou"], case["score_thr"],
                                        center_point_box=case["cpb"], trace=True)
        assert ours.selected_indices.dtype == np.int64
        np.testing.assert_array_equal(ours.selected_indices, expected, err_msg=f"case {k}")
        for b, r in enumerate(ours.results):
            assert_trace_consistent(r)
            rows = expected[expected[:, 0] == b]
            np.testing.assert_array_equal(r.box_index, rows[:, 2])
            np.testing.assert_array_equal(r.labels, rows[:, 1])
            tr = r.trace
            iou32 = np.float32(case["iou"])
            hit["exact_iou_kept"] += int(np.count_nonzero(tr.iou == iou32))
        s, bx = case["scores"], case["boxes"]
        hit["ties"] += int(s.size != np.unique(s).size)
        if case["score_thr"] is not None:
            hit["score_at_threshold"] += int(np.any(s == np.float32(case["score_thr"])))
        if case["cpb"] == 0:
            hit["zero_area"] += int(np.any((bx[..., 0] == bx[..., 2]) | (bx[..., 1] == bx[..., 3])))
            hit["reversed"] += int(np.any(bx[..., 0] > bx[..., 2]))
        hit["selected"] += len(expected)
    # the generator really produced the edges this test is about
    assert hit["ties"] > 300 and hit["score_at_threshold"] > 200
    assert hit["zero_area"] > 200 and hit["reversed"] > 200 and hit["selected"] > 3000


def test_iou_exactly_at_threshold_is_not_suppressed():
    # [y1, x1, y2, x2]: intersection 50, union 100 -> IoU 0.5 exactly in float32
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 5]]], np.float32)
    scores = np.array([[[0.9, 0.8]]], np.float32)
    out = onnx_non_max_suppression(boxes, scores, 10, 0.5, None, trace=True)
    np.testing.assert_array_equal(out.selected_indices, [[0, 0, 0], [0, 0, 1]])
    # just below the IoU, the smaller box is suppressed by box 0
    out = onnx_non_max_suppression(boxes, scores, 10, 0.49, None, trace=True)
    np.testing.assert_array_equal(out.selected_indices, [[0, 0, 0]])
    fate = out.results[0].trace.fate(1, 0)
    assert fate.kind == FateKind.SUPPRESSED and fate.by_box == 0
    assert fate.iou == pytest.approx(0.5) and not fate.inclusive
    assert str(fate) == "suppressed by box 0 (class 0) at IoU 0.500 > 0.490"


def test_score_exactly_at_threshold_is_dropped_and_absent_threshold_keeps_all():
    boxes = np.array([[[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10]]], np.float32)
    scores = np.array([[[0.5, 0.25, 0.0]]], np.float32)
    out = onnx_non_max_suppression(boxes, scores, 10, 0.5, 0.25, trace=True)
    np.testing.assert_array_equal(out.selected_indices, [[0, 0, 0]])
    fate = out.results[0].trace.fate(1, 0)
    assert fate.kind == FateKind.BELOW_SCORE_THRESHOLD and not fate.inclusive
    assert str(fate) == "score 0.25 <= threshold 0.25"
    out = onnx_non_max_suppression(boxes, scores, 10, 0.5, None)
    np.testing.assert_array_equal(out.selected_indices[:, 2], [0, 1, 2])


def test_ties_lower_box_index_first_and_reverse_what_if():
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]], np.float32)
    scores = np.array([[[0.5, 0.5, 0.5]]], np.float32)
    stable = onnx_non_max_suppression(boxes, scores, 10, 0.5, None, trace=True)
    np.testing.assert_array_equal(stable.selected_indices[:, 2], [0, 2])
    assert stable.results[0].trace.fate(1, 0).by_box == 0
    reverse = onnx_non_max_suppression(boxes, scores, 10, 0.5, None, tie_order="reverse",
                                       trace=True)
    np.testing.assert_array_equal(reverse.selected_indices[:, 2], [2, 1])
    assert reverse.results[0].trace.fate(0, 0).by_box == 1


def test_max_output_per_class_and_output_grouped_by_batch_then_class():
    rng = np.random.default_rng(1)
    boxes = (rng.integers(0, 50, (2, 6, 1)) * 20 + np.array([0, 0, 10, 10])).astype(np.float32)
    scores = rng.random((2, 3, 6)).astype(np.float32)
    out = onnx_non_max_suppression(boxes, scores, 2, 0.5, None, trace=True)
    sel = out.selected_indices
    # batch-major, then class-major, and at most 2 per (batch, class)
    assert np.all(np.diff(sel[:, 0] * 10 + sel[:, 1]) >= 0)
    _, counts = np.unique(sel[:, :2], axis=0, return_counts=True)
    assert counts.max() == 2
    for r in out.results:
        assert_trace_consistent(r)
        cut = r.trace.code == FateKind.CUT_MAX_DETECTIONS
        assert cut.any() and np.all(r.trace.rank[cut] >= 2) and np.all(r.trace.limit[cut] == 2)


def test_center_point_box_boxes_are_returned_as_corners():
    boxes = np.array([[[5, 5, 4, 2], [30, 30, 2, 2]]], np.float32)
    scores = np.array([[[0.9, 0.8]]], np.float32)
    out = onnx_non_max_suppression(boxes, scores, 5, 0.5, None, center_point_box=1)
    np.testing.assert_array_equal(out.results[0].boxes, [[3, 4, 7, 6], [29, 29, 31, 31]])


def test_tensorrt_flavour_caps_per_image_and_orders_by_score():
    # 3 classes, far-apart boxes: onnxruntime groups by class, INMSLayer sorts by score
    boxes = (np.arange(4)[:, None] * 100 + np.array([0, 0, 10, 10]))[None].astype(np.float32)
    scores = np.array([[[0.1, 0.9, 0.3, 0.35], [0.8, 0.2, 0.6, 0.05], [0.4, 0.7, 0.5, 0.15]]],
                      np.float32)
    ort = onnx_non_max_suppression(boxes, scores, 10, 0.5, 0.0)
    assert list(ort.selected_indices[:, 1]) == sorted(ort.selected_indices[:, 1])
    trt = onnx_non_max_suppression(boxes, scores, 10, 0.5, 0.0, flavour="tensorrt", trace=True)
    picked = scores[0, trt.selected_indices[:, 1], trt.selected_indices[:, 2]]
    assert np.all(np.diff(picked) < 0) and len(picked) == 12
    # a cap of 5 candidates per image (TopKBoxLimit): the rest are cut before NMS, by rank
    capped = onnx_non_max_suppression(boxes, scores, 10, 0.5, 0.0, flavour="tensorrt",
                                      topk_box_limit=5, trace=True)
    np.testing.assert_array_equal(np.sort(capped.results[0].scores)[::-1],
                                  np.sort(scores.ravel())[::-1][:5])
    tr = capped.results[0].trace
    assert_trace_consistent(capped.results[0])
    cut = tr.code == FateKind.CUT_PRE_NMS_TOPK
    assert np.count_nonzero(cut) == 7
    assert sorted(tr.rank[cut]) == list(range(5, 12)) and np.all(tr.limit[cut] == 5)
    # the 6th best score (0.4: box 0, class 2) is the first one cut
    assert tr.fate(0, 2).rank == 5


def test_tensorrt_flavour_absent_score_threshold_drops_non_positive_scores():
    boxes = np.array([[[0, 0, 1, 1], [5, 5, 6, 6]]], np.float32)
    scores = np.array([[[0.5, 0.0]]], np.float32)
    ort = onnx_non_max_suppression(boxes, scores, 5, 0.5, None)
    assert len(ort.selected_indices) == 2
    trt = onnx_non_max_suppression(boxes, scores, 5, 0.5, None, flavour="tensorrt", trace=True)
    assert len(trt.selected_indices) == 1
    assert str(trt.results[0].trace.fate(1, 0)) == "score 0 <= threshold 0"


def test_rejects_what_onnxruntime_rejects():
    boxes = np.zeros((1, 2, 4), np.float32)
    scores = np.zeros((1, 1, 2), np.float32)
    with pytest.raises(ValueError, match="iou_threshold"):
        onnx_non_max_suppression(boxes, scores, 1, 1.5)
    with pytest.raises(ValueError, match="center_point_box"):
        onnx_non_max_suppression(boxes, scores, 1, 0.5, center_point_box=2)
    with pytest.raises(ValueError, match=r"\(B, C, N\)"):
        onnx_non_max_suppression(boxes, scores.transpose(0, 2, 1), 1, 0.5)
