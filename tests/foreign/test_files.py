"""The foreign files load, run where onnxruntime can run them, and keep the structure recorded
in tests/foreign/README.md: output names and shapes, the NMS node and its attributes, the
TopK nodes and their K, the box coding fed to NMS, the node scopes. A change in mmdeploy's or
easydeploy's conventions fails here first."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

NUM_PRIORS = 3 * (40 * 40 + 20 * 20 + 10 * 10)  # 6300 candidates at 320x320, 3 anchors
NUM_CLASSES = 5


# -- reading a graph ---------------------------------------------------------------------

def load(path: Path) -> Any:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model


def nodes(model: Any, op_type: str) -> list[Any]:
    return [n for n in model.graph.node if n.op_type == op_type]


def only_node(model: Any, op_type: str) -> Any:
    found = nodes(model, op_type)
    assert len(found) == 1, f"{len(found)} {op_type} nodes"
    return found[0]


def attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def constants(model: Any) -> dict[str, np.ndarray]:
    """Tensor name → value, for initializers and Constant nodes."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in nodes(model, "Constant"):
        out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def dims(value_info: Any) -> list[Any]:
    """A tensor's dims as ints, or dim_param strings where symbolic."""
    return [d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in value_info.type.tensor_type.shape.dim]


def graph_outputs(model: Any) -> dict[str, tuple[list[Any], int]]:
    """Output name → (dims, element type), in graph order."""
    return {o.name: (dims(o), o.type.tensor_type.elem_type) for o in model.graph.output}


def inferred_dims(model: Any, name: str) -> list[Any]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    for vi in [*inferred.graph.value_info, *inferred.graph.input]:
        if vi.name == name:
            return dims(vi)
    raise AssertionError(f"no inferred shape for {name}")


def run_with_tensors(model: Any, feeds: dict[str, np.ndarray],
                     extra: list[str]) -> dict[str, np.ndarray]:
    """Run `model` in onnxruntime with inner tensors `extra` added as outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in extra:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def tensor_before(model: Any, input_name: str, tensor: str,
                  feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Compute one inner tensor in onnxruntime from the part of the graph that makes it (so a
    graph whose later plugin node onnxruntime cannot run still gives the NMS inputs)."""
    import onnxruntime as ort
    from onnx import shape_inference
    from onnx.utils import Extractor

    part = Extractor(shape_inference.infer_shapes(model)).extract_model([input_name], [tensor])
    session = ort.InferenceSession(part.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def foreign_file(request: Any, tool: str, name: str) -> Path:
    """The file `name` of `tool` ("mmdeploy" or "easydeploy"), asking only for that tool's
    fixture (an easydeploy case runs where mmdeploy is not installed)."""
    return request.getfixturevalue(f"{tool}_file")(name).path


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2,
                           boxes[..., 2:] - boxes[..., :2]], -1)


@pytest.fixture(scope="module")
def torch_boxes(fixture_model, fixture_batch) -> np.ndarray:
    """mmyolo's decoded candidate boxes, (4, 6300, 4) xyxy input pixels."""
    from harness.backends import TorchBackend

    return TorchBackend(fixture_model, outputs="decoded").infer(fixture_batch.inputs)["boxes"]


FLOAT, INT32, INT64 = 1, 6, 7  # onnx.TensorProto element types


# -- mmdeploy 1.3.1 ----------------------------------------------------------------------

# the NMS each mmdeploy file holds (thresholds come from the fixture's test_cfg: IoU 0.65,
# score_thr 0.001; pre_top_k, max_output_boxes_per_class from the deploy config)
MMDEPLOY_ORT_NMS = {  # name → (max_output_boxes_per_class, pre-NMS TopK K at 320x320)
    "mmdeploy_ort_dynamic": (200, 5000),
    "mmdeploy_ort_cut": (100, 1000),
}
MMDEPLOY_TRT_NMS = {  # name → mmdeploy::TRTBatchedNMS attributes
    "mmdeploy_trt_static": {"topk": 5000, "keep_topk": 200},
    "mmdeploy_trt_cut": {"topk": 1000, "keep_topk": 100},
}
TRT_BATCHED_NMS_COMMON = {"background_label_id": -1, "clip_boxes": 0, "is_normalized": 0,
                          "num_classes": NUM_CLASSES, "return_index": 0}


@pytest.mark.parametrize("name", sorted(MMDEPLOY_ORT_NMS))
def test_mmdeploy_onnxruntime_file_runs_with_its_topk_and_nms(name, mmdeploy_file,
                                                              fixture_batch):
    model = load(mmdeploy_file(name).path)
    max_per_class, pre_k = MMDEPLOY_ORT_NMS[name]
    assert [i.name for i in model.graph.input] == ["input"]
    assert dims(model.graph.input[0]) == ["batch", 3, "height", "width"]
    outputs = graph_outputs(model)
    assert list(outputs) == ["dets", "labels"]
    assert outputs["dets"][0][:2] == ["batch", "num_dets"] and outputs["dets"][1] == FLOAT
    assert outputs["labels"] == (["batch", "num_dets"], INT64)

    nms = only_node(model, "NonMaxSuppression")
    assert attributes(nms) == {}  # center_point_box 0: boxes are corners
    values = constants(model)
    assert values[nms.input[2]].shape == () and int(values[nms.input[2]]) == max_per_class
    np.testing.assert_allclose(values[nms.input[3]], [0.65])
    np.testing.assert_allclose(values[nms.input[4]], [0.001])

    pre_topk, keep_topk = nodes(model, "TopK")  # K computed in the graph: min(k, size)
    assert attributes(pre_topk) == attributes(keep_topk) == {"axis": 1, "largest": 1,
                                                             "sorted": 1}
    got = run_with_tensors(model, {"input": fixture_batch.inputs},
                           [pre_topk.input[1], keep_topk.input[1]])
    assert got[pre_topk.input[1]].tolist() == [pre_k]
    # the keep TopK: min(max_per_img 300, all images' selections + 1 pad row)
    rows = got["dets"].shape[1]
    assert got[keep_topk.input[1]].tolist() == [rows] and rows <= 300
    assert got["dets"].shape == (4, rows, 5) and got["labels"].shape == (4, rows)
    found = got["dets"][..., 4] > 0
    assert found.sum(1).min() > 0
    # rows of other images, and the pad row, have score 0 and label -1 or 0
    assert set(np.unique(got["labels"][~found])) <= {-1, 0}


@pytest.mark.parametrize("name", sorted(MMDEPLOY_TRT_NMS))
def test_mmdeploy_tensorrt_file_holds_trt_batched_nms(name, mmdeploy_file):
    model = load(mmdeploy_file(name).path)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 11), ("mmdeploy", 1)}
    assert dims(model.graph.input[0]) == [1, 3, 320, 320]
    outputs = graph_outputs(model)
    assert list(outputs) == ["dets", "labels"]
    assert (outputs["dets"][1], outputs["labels"][1]) == (FLOAT, INT64)
    assert not nodes(model, "TopK") and not nodes(model, "NonMaxSuppression")

    nms = only_node(model, "TRTBatchedNMS")
    assert nms.domain == "mmdeploy"
    attrs = attributes(nms)
    assert attrs.pop("iou_threshold") == pytest.approx(0.65)
    assert attrs.pop("score_threshold") == pytest.approx(0.001)
    assert attrs == {**TRT_BATCHED_NMS_COMMON, **MMDEPLOY_TRT_NMS[name]}
    assert inferred_dims(model, nms.input[0]) == [1, NUM_PRIORS, 1, 4]
    assert inferred_dims(model, nms.input[1]) == [1, NUM_PRIORS, NUM_CLASSES]
    assert list(nms.output) == ["/TRTBatchedNMS_output_0", "/TRTBatchedNMS_output_1"]


def test_mmdeploy_efficientnms_file_feeds_centre_size_boxes_as_corners(mmdeploy_file):
    model = load(mmdeploy_file("mmdeploy_trt_efficientnms").path)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 11), ("TRT", 1)}
    outputs = graph_outputs(model)
    assert list(outputs) == ["dets", "labels"]
    assert (outputs["dets"][1], outputs["labels"][1]) == (FLOAT, INT32)
    nms = only_node(model, "EfficientNMS_TRT")
    assert nms.domain == "TRT"
    attrs = attributes(nms)
    assert attrs.pop("iou_threshold") == pytest.approx(0.65)
    assert attrs.pop("score_threshold") == pytest.approx(0.001)
    # box_coding 0 (corners) although the boxes are centre-size (next test)
    assert attrs == {"background_class": -1, "box_coding": 0, "max_output_boxes": 300,
                     "plugin_version": "1", "score_activation": 0}
    assert inferred_dims(model, nms.input[0]) == [1, NUM_PRIORS, 1, 4]
    # num_detections (output 0) is dropped; dets = concat(boxes, scores), labels = classes
    used = {i for n in model.graph.node for i in n.input}
    assert nms.output[0] not in used and all(o in used for o in nms.output[1:])


# the box coding of the tensor each file feeds its NMS, checked against mmyolo's own boxes
NMS_BOX_CODING = [("mmdeploy", "mmdeploy_trt_static", "xyxy"),
                  ("mmdeploy", "mmdeploy_trt_efficientnms", "xywh"),
                  ("easydeploy", "tensorrt8", "xywh"),
                  ("easydeploy", "tensorrt7", "xyxy")]


@pytest.mark.parametrize("tool,name,coding", NMS_BOX_CODING)
def test_boxes_fed_to_nms_are_in_the_recorded_coding(tool, name, coding, request,
                                                     fixture_batch, torch_boxes):
    model = load(foreign_file(request, tool, name))
    nms = next(n for n in model.graph.node if n.domain == "TRT" or n.domain == "mmdeploy")
    input_name = model.graph.input[0].name
    fed = tensor_before(model, input_name, nms.input[0],
                        {input_name: fixture_batch.inputs[:1]}).reshape(1, NUM_PRIORS, 4)
    want = torch_boxes[:1] if coding == "xyxy" else xyxy_to_xywh(torch_boxes[:1])
    np.testing.assert_allclose(fed, want, rtol=1e-4, atol=2e-3)


# -- easydeploy (mmyolo v0.6.0 conventions) ----------------------------------------------

EASYDEPLOY_OUTPUTS = ["num_dets", "boxes", "scores", "labels"]


def test_easydeploy_onnxruntime_file_runs(easydeploy_file, fixture_batch):
    from tests.foreign.easydeploy_export import XYWH_TO_XYXY

    model = load(easydeploy_file("onnxruntime").path)
    assert [i.name for i in model.graph.input] == ["images"]
    assert dims(model.graph.input[0]) == [1, 3, 320, 320]
    outputs = graph_outputs(model)
    assert list(outputs) == EASYDEPLOY_OUTPUTS
    assert [t for _, t in outputs.values()] == [INT64, FLOAT, FLOAT, INT32]

    nms = only_node(model, "NonMaxSuppression")
    assert attributes(nms) == {}
    values = constants(model)
    assert values[nms.input[2]].tolist() == [100]  # keep_top_k, per class
    np.testing.assert_allclose(values[nms.input[3]], [0.65])
    np.testing.assert_allclose(values[nms.input[4]], [0.25])
    matmul = only_node(model, "MatMul")  # xywh → xyxy before NMS
    assert nms.input[0] == matmul.output[0]
    np.testing.assert_array_equal(values[matmul.input[1]], XYWH_TO_XYXY.numpy())

    sort = only_node(model, "TopK")  # a full sort by score, not a cut
    assert attributes(sort) == {"axis": 1, "largest": 1}
    got = run_with_tensors(model, {"images": fixture_batch.inputs[:1]}, [sort.input[1]])
    rows = got["boxes"].shape[1]
    assert got[sort.input[1]].tolist() == [rows]
    num = int(got["num_dets"][0, 0])
    assert 0 < num == rows - 1 == int((got["scores"][0] > 0).sum())
    assert got["labels"][0, -1] == -1 and got["scores"][0, -1] == 0
    assert got["scores"][0, :num].min() > 0.25


EASYDEPLOY_TRT_NMS = {
    "tensorrt8": ("EfficientNMS_TRT", {
        "background_class": -1, "box_coding": 1, "max_output_boxes": 100,
        "plugin_version": "1", "score_activation": 0}),
    "tensorrt7": ("BatchedNMSDynamic_TRT", {
        "backgroundLabelId": -1, "caffeSemantics": 1, "clipBoxes": 0, "isNormalized": 0,
        "keepTopK": 100, "numClasses": NUM_CLASSES, "plugin_version": "1", "scoreBits": 16,
        "shareLocation": 1, "topK": 1000}),
}
EASYDEPLOY_THRESHOLDS = {"tensorrt8": ("iou_threshold", "score_threshold"),
                         "tensorrt7": ("iouThreshold", "scoreThreshold")}


@pytest.mark.parametrize("backend", sorted(EASYDEPLOY_TRT_NMS))
def test_easydeploy_tensorrt_file_holds_the_plugin(backend, easydeploy_file):
    model = load(easydeploy_file(backend).path)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 11), ("TRT", 1)}
    assert dims(model.graph.input[0]) == [1, 3, 320, 320]
    # export_onnx.py writes the output dims as dim_param strings ("just for view")
    assert graph_outputs(model) == {"num_dets": (["1", "1"], INT32),
                                    "boxes": (["1", "100", "4"], FLOAT),
                                    "scores": (["1", "100"], FLOAT),
                                    "labels": (["1", "100"], INT32)}
    assert not nodes(model, "TopK") and not nodes(model, "NonMaxSuppression")
    op_type, want = EASYDEPLOY_TRT_NMS[backend]
    nms = only_node(model, op_type)
    assert nms.domain == "TRT"
    attrs = attributes(nms)
    iou, score = EASYDEPLOY_THRESHOLDS[backend]
    assert attrs.pop(iou) == pytest.approx(0.65) and attrs.pop(score) == pytest.approx(0.25)
    assert attrs == want
    box_dims = [1, NUM_PRIORS, 4] if backend == "tensorrt8" else [1, NUM_PRIORS, 1, 4]
    assert inferred_dims(model, nms.input[0]) == box_dims
    if backend == "tensorrt8":  # the plugin's outputs are the graph's
        assert list(nms.output) == EASYDEPLOY_OUTPUTS
    else:  # classes come out as float and are cast to int32 after the plugin
        assert list(nms.output[:3]) == EASYDEPLOY_OUTPUTS[:3]
        cast = only_node(model, "Cast")
        assert list(cast.input) == [nms.output[3]] and list(cast.output) == ["labels"]
        assert attributes(cast) == {"to": INT32}


# -- node scopes: where the 60 convolutions' names put the module path ----------------------

SCOPES = [  # (tool, name, prefix of every Conv, the head's last Conv)
    ("mmdeploy", "mmdeploy_ort_dynamic", "/", "/bbox_head/head_module/convs_pred.2/Conv"),
    ("mmdeploy", "mmdeploy_trt_static", "/", "/bbox_head/head_module/convs_pred.2/Conv"),
    ("easydeploy", "onnxruntime", "/baseModel/", "/baseModel/head_module/convs_pred.2/Conv"),
    ("easydeploy", "tensorrt8", "/baseModel/", "/baseModel/head_module/convs_pred.2/Conv"),
]


@pytest.mark.parametrize("tool,name,prefix,head_conv", SCOPES)
def test_conv_scopes(tool, name, prefix, head_conv, request):
    convs = nodes(load(foreign_file(request, tool, name)), "Conv")
    assert len(convs) == 60
    assert convs[0].name == f"{prefix}backbone/stem/conv/Conv"
    assert convs[0].output[0] == f"{prefix}backbone/stem/conv/Conv_output_0"
    assert convs[-1].name == head_conv
    tops = {c.name[len(prefix):].split("/")[0] for c in convs}
    # easydeploy: mmdet calls bbox_head.forward() directly, so no bbox_head scope
    assert tops == ({"backbone", "neck", "bbox_head"} if tool == "mmdeploy"
                    else {"backbone", "neck", "head_module"})
