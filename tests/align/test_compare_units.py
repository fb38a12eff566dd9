"""Pieces of the compare run that need no model: the nodes a debug engine marks for an NMS
plugin's inputs, and the one-sentence verdict."""
from __future__ import annotations

from onnx import helper

from harness.align.compare import producers
from harness.align.compare import verdict as _verdict
from harness.results import TargetResult


def verdict(targets):
    """The verdict over targets written as they read back from results.json."""
    return _verdict([TargetResult.from_json(t) for t in targets])


def testproducers_of_plugin_inputs():
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["boxes"], name="/Concat", axis=1),
         helper.make_node("Mul", ["s", "o"], ["scores"], name="/Mul"),
         helper.make_node("EfficientNMS_TRT", ["boxes", "scores"], ["n"], name="nms",
                          domain="TRT")], "g", [], [])
    proto = helper.make_model(graph)
    assert producers(proto, ["boxes", "scores", "images"]) == ["/Concat", "/Mul"]


def _target(name, mismatches, causes=None, past=None, available=True, ties=(0, 0),
            reference=10, settings=(), nonfinite=None):
    return {"name": name, "path": name, "kind": "onnx", "available": available,
            "reason": None if available else
            "not available: TensorRT is not available", "precision": "fp16",
            "layers": {"rows": [{}], "first_past_tolerance": past,
                       "first_nonfinite": nonfinite, "layers_with_nonfinite": 1},
            "detections": {"mismatches": mismatches, "reference": reference,
                           "target": reference, "causes": causes or {},
                           "ties": {"reference": ties[0], "target": ties[1]},
                           "settings_differ": list(settings)}}


def test_verdict_names_counts_causes_layers_and_unavailable_targets():
    text = verdict([
        _target("a.onnx", 0),
        _target("b.onnx", 5, {"drift": 3, "score_edge": 2},
                {"module": "backbone.stem", "rel_l2": 0.02, "tolerance": 0.01}),
        _target("c.engine", 0, available=False)])
    assert "a.onnx matches PyTorch" in text and "all 10 detections agree" in text
    assert "b.onnx differs from PyTorch in 5 detections (3 drift, 2 score edge)" in text
    assert "first past its fp16 tolerance at backbone.stem" in text
    assert "c.engine was not available: TensorRT is not available" in text
    assert "tie groups" not in text


def test_verdict_never_says_agree_without_the_tie_count():
    text = verdict([_target("a.onnx", 0, ties=(4, 3))])
    assert "all 10 detections agree; 4 PyTorch and 3 target detections sit in tie groups" \
        in text


def test_verdict_says_when_nothing_was_compared():
    text = verdict([_target("a.onnx", 0, reference=0)])
    assert "agree" not in text and "no detection was compared" in text


def test_verdict_names_settings_differences_and_nonfinite_layers():
    text = verdict([_target(
        "a.onnx", 652, {"nms_settings": 652},
        settings=[{"label": "score threshold", "reference": 0.001, "target": 0.25,
                   "explains": 652}],
        nonfinite={"module": "neck.x", "target": 17, "reference": 0})])
    assert "652 nms settings" in text
    assert "NMS settings differ: score threshold 0.25 vs 0.001 (652 detections)" in text
    assert "inf/NaN first at neck.x (17 values in the target, 0 in PyTorch" in text
