"""Pieces of the compare run that need no model: the nodes a debug engine marks for an NMS
plugin's inputs, and the one-sentence verdict."""
from __future__ import annotations

from onnx import helper

from harness.align.compare import _producers, verdict


def test_producers_of_plugin_inputs():
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["boxes"], name="/Concat", axis=1),
         helper.make_node("Mul", ["s", "o"], ["scores"], name="/Mul"),
         helper.make_node("EfficientNMS_TRT", ["boxes", "scores"], ["n"], name="nms",
                          domain="TRT")], "g", [], [])
    proto = helper.make_model(graph)
    assert _producers(proto, ["boxes", "scores", "images"]) == ["/Concat", "/Mul"]


def _target(name, mismatches, causes=None, past=None, available=True):
    return {"name": name, "available": available, "reason": None if available else
            "not available: TensorRT is not available", "precision": "fp16",
            "layers": {"rows": [{}], "first_past_tolerance": past},
            "detections": {"mismatches": mismatches, "reference": 10,
                           "causes": causes or {}}}


def test_verdict_names_counts_causes_layers_and_unavailable_targets():
    text = verdict([
        _target("a.onnx", 0),
        _target("b.onnx", 5, {"drift": 3, "score_edge": 2},
                {"module": "backbone.stem", "rel_l2": 0.02}),
        _target("c.engine", 0, available=False)])
    assert "a.onnx matches PyTorch" in text and "all 10 detections agree" in text
    assert "b.onnx differs from PyTorch in 5 detections (3 drift, 2 score edge)" in text
    assert "first past its fp16 tolerance at backbone.stem" in text
    assert "c.engine was not available: TensorRT is not available" in text
