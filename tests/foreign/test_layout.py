"""harness.artifacts.layout.read_layout: what each file is, read from its graph — the
convention, the NMS node, every setting with where it came from, the candidate tensors before
any TopK, the TopK cuts — for the harness's own files and the foreign ones; a file that is
none of them is one line naming the layouts known."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from harness.artifacts.layout import read_layout
from harness.errors import UserError
from harness.export.metadata import read_metadata


def layout_of(path, head_variant=None):
    proto = onnx.load(str(path))
    return read_layout(proto, read_metadata(proto), head_variant)


@pytest.mark.parametrize("nms, kind, convention", [
    ("onnx", "onnx", "harness onnx"), ("efficient", "efficient", "harness efficient"),
    ("batched", "batched", "harness batched")])
def test_harness_end2end_files(fixture_onnx, nms, kind, convention):
    lay = layout_of(fixture_onnx(variant="end2end", nms=nms).path)
    assert (lay.variant, lay.convention, lay.nms_kind) == ("end2end", convention, kind)
    assert lay.pre_topk is None and lay.keep_topk is None  # the harness exports no TopK
    assert lay.candidate_boxes and lay.candidate_scores
    assert all(s.source in ("attribute", "constant input") or s.source.startswith("assumed")
               for s in lay.settings.values())
    if kind == "onnx":
        assert lay.settings["iou_threshold"].source == "constant input"
        assert lay.settings["iou_threshold"].value == pytest.approx(0.65)


def test_raw_outputs_are_the_sources_own(fixture_onnx):
    path = fixture_onnx().path
    assert layout_of(path, "raw").variant == "raw"
    with pytest.raises(UserError, match="match no layout the harness knows"):
        layout_of(path)  # without a model source to vouch for the names


def test_easydeploy_onnxruntime_settings_are_constant_inputs(easydeploy_file):
    lay = layout_of(easydeploy_file("onnxruntime").path)
    assert lay.convention == "easydeploy" and lay.nms_kind == "onnx"
    s = lay.settings
    assert s["score_threshold"].value == pytest.approx(0.25)
    assert s["score_threshold"].source == "constant input"
    assert s["max_output_boxes_per_class"].value == 100
    assert s["center_point_box"].source.startswith("assumed")


def test_mmdeploy_topk_cuts_are_found_with_their_bounds(mmdeploy_file):
    lay = layout_of(mmdeploy_file("mmdeploy_ort_cut").path)
    assert lay.convention == "mmdeploy" and lay.pre_topk and lay.keep_topk
    for name in ("pre_topk", "keep_topk"):
        assert lay.settings[name].source.startswith("constant in the graph")
    # the candidates are read before the pre-NMS TopK's Gather, not after it
    proto = onnx.load(str(mmdeploy_file("mmdeploy_ort_cut").path))
    producers = {o: n for n in proto.graph.node for o in n.output}
    assert producers[lay.candidate_scores].op_type != "Gather"


def test_mmdeploy_tensorrt_plugin_attributes(mmdeploy_file):
    lay = layout_of(mmdeploy_file("mmdeploy_trt_cut").path)
    assert lay.nms_kind == "mmdeploy_batched"
    assert (lay.settings["keep_topk"].value, lay.settings["keep_topk"].source) == \
        (100, "attribute")


def _graph_with_two_nms(tmp_path):
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 10, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 10])
    outs = [helper.make_tensor_value_info(n, TensorProto.INT64, [None, 3]) for n in "ab"]
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores"], [n], name=f"nms_{n}")
             for n in "ab"]
    return helper.make_model(helper.make_graph(nodes, "g", [boxes, scores], outs))


def test_two_nms_nodes_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="2 NMS nodes .*nms_a, nms_b"):
        read_layout(_graph_with_two_nms(tmp_path))


def test_outputs_of_no_convention_around_an_nms_node(tmp_path):
    proto = _graph_with_two_nms(tmp_path)
    del proto.graph.node[1]
    del proto.graph.output[1]
    with pytest.raises(UserError, match="with a NonMaxSuppression node.*mmdeploy end2end"):
        read_layout(proto)
