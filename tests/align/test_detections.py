"""Post-NMS matching and the cause of every mismatch, on hand-made candidates replayed by the
real mmyolo kernel with different settings on each side."""
from __future__ import annotations

import numpy as np
import pytest

from harness.align.detections import CAUSES, DetectionDiff, Tolerances, box_iou, match
from harness.align.pipelines import PipelineSettings, Replayed
from harness.nms import NmsResult, mmyolo_nms


def side(boxes, scores, *, iou=0.65, nms_pre=1000, max_per_img=300, thr=0.001,
         multi_label=True):
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    r = mmyolo_nms(boxes, scores, None, score_thr=thr, nms_pre=nms_pre, iou_threshold=iou,
                   max_per_img=max_per_img, multi_label=multi_label, trace=True)
    settings = PipelineSettings(score_threshold=thr, score_inclusive=False, iou_threshold=iou,
                                iou_inclusive=False, pre_topk=nms_pre,
                                max_detections=max_per_img, iou_formula="mmcv")
    return Replayed(r, boxes, scores, settings)


def apart(n, size=10.0):
    """n boxes that do not overlap."""
    return [[20.0 * i, 0.0, 20.0 * i + size, size] for i in range(n)]


def one_class(scores):
    return [[s] for s in scores]


def diff_of(ref, tgt, tol=Tolerances()):
    d = DetectionDiff(tol)
    found = d.add_image("img.jpg", ref, tgt)
    return d, found


def test_match_is_greedy_by_score_and_class_aware():
    a = NmsResult(np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32),
                  np.array([0.5, 0.9], np.float32), np.array([0, 0]), np.array([0, 1]))
    b = NmsResult(np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10]], np.float32),
                  np.array([0.9, 0.8, 0.7], np.float32), np.array([0, 0, 1]),
                  np.array([0, 1, 2]))
    m = match(a.boxes, a.scores, a.labels, b.boxes, b.labels)
    # the 0.9 reference detection goes first and takes the exact box
    assert m.pairs == [(1, 0), (0, 1)] and m.lonely_ref == [] and m.lonely_tgt == [2]
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(1 / 3)


def test_identical_sides_have_no_mismatch():
    ref = side(apart(4), one_class([0.9, 0.8, 0.7, 0.6]))
    d, found = diff_of(ref, side(apart(4), one_class([0.9, 0.8, 0.7, 0.6])))
    s = d.summary().to_json()
    assert found == [] and s["match_rate"] == 1.0 and s["matched"] == 4
    assert s["causes"] == dict.fromkeys(CAUSES, 0)


def test_topk_cut_with_ranks():
    scores = one_class([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    d, found = diff_of(side(apart(6), scores), side(apart(6), scores, nms_pre=3))
    assert [m.cause for m in found] == ["topk_cut"] * 3
    assert [(m.side, m.rank, m.limit) for m in found] == [("reference", r, 3) for r in (3, 4, 5)]
    assert d.summary().to_json()["causes"]["topk_cut"] == 3


def test_max_detections_cut_with_ranks():
    scores = one_class([0.9, 0.8, 0.7, 0.6])
    _, found = diff_of(side(apart(4), scores), side(apart(4), scores, max_per_img=2))
    assert [(m.cause, m.rank, m.limit) for m in found] == [("max_det_cut", 2, 2),
                                                          ("max_det_cut", 3, 2)]


def test_tie_at_the_topk_boundary_is_tie_order():
    scores = one_class([0.9, 0.8, 0.7, 0.7, 0.3])
    _, found = diff_of(side(apart(5), scores), side(apart(5), scores, nms_pre=3))
    causes = {m.box: m.cause for m in found}
    assert causes == {3: "tie_order", 4: "topk_cut"}


def test_score_edge():
    ref = side(apart(3), one_class([0.9, 0.0012, 0.5]))
    tgt = side(apart(3), one_class([0.9, 0.0009, 0.5]))
    _, found = diff_of(ref, tgt)
    assert [(m.cause, m.side, m.box) for m in found] == [("score_edge", "reference", 1)]
    assert "threshold" in found[0].detail


def _iou_edge_boxes():
    x = 3.45 / 1.655  # IoU(A, B) = (10 - x) / (10 + x) ≈ 0.655
    return [[0, 0, 10, 10], [x, 0, 10 + x, 10], [x + 0.5, 0, 10.5 + x, 10]]


def test_iou_edge_and_its_chain():
    boxes = _iou_edge_boxes()
    ious = box_iou(boxes, boxes)
    assert 0.65 < ious[0, 1] < 0.66 and ious[1, 2] > 0.66 and ious[0, 2] < 0.65
    # A and B alone: B survives IoU 0.66 but not 0.65
    _, found = diff_of(side(boxes[:2], one_class([0.9, 0.8]), iou=0.65),
                       side(boxes[:2], one_class([0.9, 0.8]), iou=0.66))
    assert [(m.cause, m.side, m.box) for m in found] == [("iou_edge", "target", 1)]
    # with C: the reference keeps C (B is gone), the target keeps B, which suppresses C; the
    # object matches across sides but by different candidates, and the reason is B's IoU edge
    d, found = diff_of(side(boxes, one_class([0.9, 0.8, 0.7]), iou=0.65),
                       side(boxes, one_class([0.9, 0.8, 0.7]), iou=0.66))
    assert [(m.cause, m.side, m.box) for m in found] == [("iou_edge", "both", 2)]
    assert "another candidate (row 1)" in found[0].detail and "lacks because" in found[0].detail
    assert d.summary().to_json()["unexplained"] == 0


def test_drift_of_a_matched_pair_and_of_a_box_moved_apart():
    boxes = apart(2)
    moved = [list(boxes[0]), [b + 1.0 for b in boxes[1]]]
    _, found = diff_of(side(boxes, one_class([0.9, 0.8])), side(moved, one_class([0.9, 0.8])))
    assert [(m.cause, m.side) for m in found] == [("drift", "both")]
    far = [list(boxes[0]), [b + 8.0 for b in boxes[1]]]  # IoU < 0.5: no longer matched
    _, found = diff_of(side(boxes, one_class([0.9, 0.8])), side(far, one_class([0.9, 0.8])))
    assert sorted((m.cause, m.side) for m in found) == [("drift", "reference"),
                                                        ("drift", "target")]


def test_multi_label_vs_best_class_is_nms_mode():
    boxes = apart(1)
    scores = [[0.8, 0.6]]
    _, found = diff_of(side(boxes, scores), side(boxes, scores, multi_label=False))
    assert [(m.cause, m.cls) for m in found] == [("nms_mode", 1)]


def test_different_candidate_sets_are_unexplained_not_guessed():
    d, found = diff_of(side(apart(2), one_class([0.9, 0.8])), side(apart(3),
                       one_class([0.9, 0.8, 0.7])))
    assert [m.cause for m in found] == ["unexplained"]
    s = d.summary().to_json()
    assert s["unexplained"] == 1 and sum(s["causes"].values()) == s["mismatches"]
    assert s["match_rate"] == pytest.approx(2 * 2 / 5)


def test_two_overlapping_boxes_swapping_score_order_is_drift():
    boxes = [[0, 0, 10, 10], [1.0, 0, 11.0, 10]]
    _, found = diff_of(side(boxes, one_class([0.80, 0.79])),
                       side(boxes, one_class([0.79, 0.80])))
    # the object is matched on both sides, by different candidates whose order swapped
    assert [(m.cause, m.side) for m in found] == [("drift", "both")]
    assert "swap order" in found[0].detail


def test_degenerate_boxes_match_by_corner_distance():
    """A zero-width box at the image border and its twin moved 1e-4 px have IoU 0: they are
    the same detection (matched by corner distance); moved 0.7 px they are drift that says
    so; moved 2 px they are two detections."""
    boxes = [[0, 0, 10, 10], [50.0, 5.0, 50.0, 15.0]]
    scores = one_class([0.9, 0.8])
    for shift, expected in ((1e-4, []), (0.7, [("drift", "both")]),
                            (2.0, [("drift", "reference"), ("drift", "target")])):
        # the twin's right edge moved: 1e-4 px wide, so IoU with the zero-width box is 0
        moved = [boxes[0], [50.0, 5.0, 50.0 + shift, 15.0]]
        d, found = diff_of(side(boxes, scores), side(moved, scores))
        assert sorted((m.cause, m.side) for m in found) == expected, shift
        assert d.summary().to_json()["degenerate_matched"] == (1 if shift < 1 else 0)
        if shift == 0.7:
            assert "degenerate box" in found[0].detail and "corner distance" in found[0].detail


def test_score_threshold_difference_is_one_settings_cause():
    """0.25 against 0.001: a 0.1 score is a settings difference, a score within the
    tolerance of 0.25 is an edge, both sides with the same threshold give no cause."""
    scores = one_class([0.9, 0.1, 0.2, 0.5])
    d, found = diff_of(side(apart(4), scores), side(apart(4), scores, thr=0.25))
    causes = {m.box: (m.cause, m.setting) for m in found}
    assert causes == {1: ("nms_settings", "score_threshold"), 2: ("nms_settings",
                                                                 "score_threshold")}
    near = one_class([0.9, 0.2505, 0.5])
    _, found = diff_of(side(apart(3), near),
                       side(apart(3), one_class([0.9, 0.2499, 0.5]), thr=0.25))
    assert [(m.cause, m.box) for m in found] == [("score_edge", 1)]
    (row,) = d.summary().to_json()["settings_differ"][:1]
    assert (row["setting"], row["reference"], row["target"], row["explains"]) == \
        ("score_threshold", 0.001, 0.25, 2)


def test_settings_that_give_no_output_are_one_cause():
    import dataclasses

    scores = one_class([0.9, 0.8])
    empty = side(apart(2), scores)
    empty.result = NmsResult.empty(empty.result.trace)
    empty.settings = dataclasses.replace(empty.settings, problem="keepTopK 300 > topK 40 → no "
                                                                 "detections")
    d, found = diff_of(side(apart(2), scores), empty)
    assert [m.cause for m in found] == ["nms_settings"] * 2
    assert d.summary().to_json()["settings_problem"].startswith("keepTopK 300 > topK 40")


def test_nonfinite_scores_and_boxes_are_their_own_cause():
    scores = one_class([0.9, 0.8, 0.7])
    bad = np.asarray(scores, np.float32)
    bad[1, 0] = np.nan
    boxes = np.asarray(apart(3), np.float32)
    inf_boxes = boxes.copy()
    inf_boxes[2, 2] = np.inf
    d, found = diff_of(side(boxes, scores), side(inf_boxes, bad))
    # the NaN-scored box is missing on the target; the inf box is on both sides but can
    # match nothing, so each side's copy is a mismatch of its own
    assert sorted((m.cause, m.side, m.box) for m in found) == [
        ("nonfinite", "reference", 1), ("nonfinite", "reference", 2),
        ("nonfinite", "target", 2)]
    assert "target score nan" in {m.box: m.detail for m in found}[1]


def test_ties_are_counted_and_the_own_output_decides():
    """Three equal scores, one kept by max detections: the replay keeps the first, mmyolo's
    own (torch) sort kept the last. The difference is tie order, the detections are counted
    as tie-dependent, and nothing is unexplained."""
    scores = one_class([0.9, 0.5, 0.5, 0.5])
    ref = side(apart(4), scores, max_per_img=2)
    tgt = side(apart(4), scores, max_per_img=2)
    # the reference's own output holds candidate 3 where its replay holds candidate 1
    own = ref.result
    own.box_index = np.array([0, 3])
    own.boxes = ref.boxes[[0, 3]]
    ref.output_pairs = {(0, 0), (3, 0)}
    d, found = diff_of(ref, tgt)
    s = d.summary().to_json()
    assert sorted((m.cause, m.side, m.box) for m in found) == [
        ("tie_order", "reference", 3), ("tie_order", "target", 1)]
    assert s["ties"] == {"reference": 1, "target": 1} and s["unexplained"] == 0
