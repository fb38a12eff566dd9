"""ONNX export: every variant on onnxruntime CPU reproduces PyTorch CPU on the harness's own
preprocessed images; names, metadata, batch axis and precision are what the file claims."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from harness.align.layers import module_path_of
from harness.backends import OnnxruntimeBackend, TorchBackend
from harness.errors import UserError
from harness.export.metadata import file_sha256, read_metadata
from harness.export.onnx_export import ExportSettings, export_onnx
from harness.models.zoo import SHIPPED_CONFIGS
from harness.align.tensor_diff import relative_l2 as rel_l2

# ONNX Runtime's CPU Sigmoid (MLAS logistic) is accurate to about 1.7e-7 absolute, not
# relative (measured: 6.5x relative error at x = -20). Where every probability is tiny (an
# untrained head's scores of 1e-5..1e-3) relative L2 measures that floor, not the export, so
# probabilities pass on either relative L2 or this absolute bound; all else on relative L2.
SIGMOID_ABS_TOL = 4e-7
REL_L2_TOL = 1e-5
PROBABILITIES = ("scores", "objectness")




def onnx_vs_torch(model, path, inputs, outputs: str) -> dict[str, tuple[float, float]]:
    """{output: (relative L2, max abs diff)} of the ONNX file on onnxruntime CPU against the
    PyTorch backend on CPU, same keys on both sides."""
    ort_out = OnnxruntimeBackend(path, provider="cpu").infer(inputs)
    torch_out = TorchBackend(model, outputs=outputs).infer(inputs)
    assert set(ort_out) == set(torch_out)
    return {k: (rel_l2(ort_out[k], torch_out[k]),
                float(np.abs(ort_out[k] - torch_out[k]).max())) for k in torch_out}


def assert_close(errors: dict[str, tuple[float, float]]) -> None:
    for name, (rel, max_abs) in errors.items():
        if name in PROBABILITIES:
            assert rel < REL_L2_TOL or max_abs <= SIGMOID_ABS_TOL, (name, rel, max_abs)
        else:
            assert rel < REL_L2_TOL, (name, rel, max_abs)


def test_raw_fp32_matches_torch(fixture_model, fixture_onnx, fixture_batch):
    result = fixture_onnx(variant="raw")
    errors = onnx_vs_torch(fixture_model, result.path, fixture_batch.inputs, "raw")
    assert sorted(errors) == sorted(f"{k}.{i}" for k in ("cls_scores", "bbox_preds",
                                                          "objectnesses") for i in range(3))
    for name, (rel, _) in errors.items():
        assert rel < REL_L2_TOL, (name, rel)


def test_decoded_fp32_matches_torch(fixture_model, fixture_onnx, fixture_batch):
    result = fixture_onnx(variant="decoded")
    errors = onnx_vs_torch(fixture_model, result.path, fixture_batch.inputs, "decoded")
    assert sorted(errors) == ["boxes", "objectness", "scores"]
    assert_close(errors)
    # on the trained fixture the probabilities are large enough for relative L2 too
    for name, (rel, _) in errors.items():
        assert rel < REL_L2_TOL, (name, rel)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SHIPPED_CONFIGS))
def test_every_family_raw_and_decoded_match_torch(family, varied_images, tmp_path):
    from harness.data.preprocess import preprocess_files
    from harness.models.mmyolo import load_mmyolo_model
    from harness.models.zoo import shipped_config

    model = load_mmyolo_model(shipped_config(family))  # mmyolo's seeded random init
    inputs = preprocess_files(varied_images[:2], model.preprocess).inputs
    for variant in ("raw", "decoded"):
        path = export_onnx(model, tmp_path / f"{variant}.onnx",
                           ExportSettings(variant=variant)).path
        errors = onnx_vs_torch(model, path, inputs, variant)
        if variant == "raw":
            assert errors and all(k.split(".")[0] in ("cls_scores", "bbox_preds",
                                                      "objectnesses") for k in errors)
            for name, (rel, _) in errors.items():
                assert rel < REL_L2_TOL, (family, name, rel)
        else:
            assert {"boxes", "scores"} <= set(errors)
            assert_close(errors)


@pytest.mark.parametrize("variant", ["raw", "decoded"])
def test_opset_11(fixture_model, fixture_onnx, fixture_batch, variant):
    result = fixture_onnx(variant=variant, opset=11)
    model = onnx.load(str(result.path))
    assert [op.version for op in model.opset_import if op.domain == ""] == [11]
    assert result.metadata["opset"] == 11
    errors = onnx_vs_torch(fixture_model, result.path, fixture_batch.inputs, variant)
    assert_close(errors)


def test_node_names_keep_module_scopes(fixture_model, fixture_onnx):
    model = onnx.load(str(fixture_onnx(variant="raw").path))
    names = {n.name for n in model.graph.node}
    for expected in ("/backbone/stem/conv/Conv", "/backbone/stage1/stage1.0/conv/Conv",
                     "/bbox_head/head_module/convs_pred.0/Conv"):
        assert expected in names
    conv_nodes = {module_path_of(n.name) for n in model.graph.node if n.op_type == "Conv"}
    conv_modules = {p for p, m in fixture_model.module.named_modules()
                    if isinstance(m, torch.nn.Conv2d)}
    # every convolution of the detector is one ONNX node named after its module path
    assert conv_nodes == conv_modules


def test_dynamic_batch_runs_batch_1_and_4(fixture_onnx, fixture_batch):
    result = fixture_onnx(variant="raw")
    backend = OnnxruntimeBackend(result.path, provider="cpu")
    backend.load()
    assert isinstance(backend.input_dims[0], str)
    four = backend.infer(fixture_batch.inputs)
    one = backend.infer(fixture_batch.inputs[:1])
    for name in four:
        assert one[name].shape[0] == 1 and four[name].shape[0] == 4
        assert rel_l2(one[name], four[name][:1]) < REL_L2_TOL


def test_static_batch_is_recorded(fixture_onnx):
    result = fixture_onnx(variant="raw", batch=1)
    model = onnx.load(str(result.path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert result.metadata["input"]["shape"] == [1, 3, 320, 320]


def test_metadata_round_trips(fixture_model, fixture_onnx):
    result = fixture_onnx(variant="end2end", nms="efficient")
    meta = read_metadata(onnx.load(str(result.path)))
    assert meta == result.metadata
    assert meta["variant"] == "end2end" and meta["precision"] == "fp32"
    assert meta["nms"] == {"kind": "efficient", "keep_topk": fixture_model.nms.max_per_img,
                           "iou_threshold": fixture_model.nms.iou_threshold,
                           "score_threshold": fixture_model.nms.score_thr, "pre_topk": None}
    assert meta["opset"] == 17 and meta["input"]["shape"] == ["batch", 3, 320, 320]
    assert meta["outputs"] == ["num_detections", "detection_boxes", "detection_scores",
                               "detection_classes"]
    source = meta["source"]
    assert source["config_sha256"] == file_sha256(fixture_model.cfg_path)
    assert source["checkpoint_sha256"] == file_sha256(fixture_model.ckpt_path)
    assert meta["model"]["class_names"] == list(fixture_model.class_names)
    assert meta["preprocess"] == json.loads(json.dumps(fixture_model.preprocess.describe()))
    assert meta["harness_version"] and meta["torch"] == torch.__version__


def _attributes(node) -> dict:
    from harness.nms.plugin_nodes import node_attributes

    return node_attributes(node)


def test_plugin_nodes_carry_the_plugins_attributes(fixture_model, fixture_onnx):
    nms = fixture_model.nms
    efficient = onnx.load(str(fixture_onnx(variant="end2end", nms="efficient").path))
    node = [n for n in efficient.graph.node if n.domain == "TRT"]
    assert [n.op_type for n in node] == ["EfficientNMS_TRT"]
    attrs = _attributes(node[0])
    assert attrs == {"score_threshold": pytest.approx(nms.score_thr),
                     "iou_threshold": pytest.approx(nms.iou_threshold),
                     "max_output_boxes": nms.max_per_img, "background_class": -1,
                     "box_coding": 0, "score_activation": 0, "plugin_version": "1"}
    batched = onnx.load(str(fixture_onnx(variant="end2end", nms="batched").path))
    node = [n for n in batched.graph.node if n.domain == "TRT"]
    assert [n.op_type for n in node] == ["BatchedNMSDynamic_TRT"]
    attrs = _attributes(node[0])
    assert attrs == {"shareLocation": 1, "backgroundLabelId": -1, "numClasses": 5,
                     "topK": min(nms.nms_pre, 4096), "keepTopK": nms.max_per_img,
                     "scoreThreshold": pytest.approx(nms.score_thr),
                     "iouThreshold": pytest.approx(nms.iou_threshold), "isNormalized": 0,
                     "clipBoxes": 0, "scoreBits": 16, "caffeSemantics": 1,
                     "plugin_version": "1"}
    # the plugins' boxes input is (B, N, 1, 4) for BatchedNMS (shareLocation)
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
              for o in batched.graph.output}
    assert shapes["nmsed_boxes"] == ["batch", nms.max_per_img, 4]


def test_fp16_file_is_half_inside_float32_outside(fixture_onnx):
    model = onnx.load(str(fixture_onnx(variant="decoded", precision="fp16").path))
    float_types = {i.data_type for i in model.graph.initializer
                   if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert onnx.TensorProto.FLOAT16 in float_types
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert all(weights[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_file_is_symmetric_qdq_on_the_network_only(fixture_onnx):
    result = fixture_onnx(variant="decoded", precision="int8")
    model = onnx.load(str(result.path))
    quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quant
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(not inits[n.input[2]].any() for n in quant if n.input[2] in inits)
    # decoding stays float: no QDQ consumer outside the network's module scopes
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    users = [n for n in model.graph.node if dq_out.intersection(n.input)]
    assert users and all(n.name.startswith(("/backbone/", "/neck/", "/bbox_head/"))
                         for n in users)
    assert result.metadata["calibration"]["method"] == "minmax"


def test_int8_calibration_cache_is_reused(fixture_model, fixture_onnx, varied_images,
                                          tmp_path):
    from harness.export.calibration import CalibrationSettings

    first = fixture_onnx(variant="decoded", precision="int8").metadata["calibration"]
    cache_dir = Path(first["cache_file"]).parent
    again = export_onnx(fixture_model, tmp_path / "again.onnx",
                        ExportSettings(variant="decoded", precision="int8"),
                        CalibrationSettings(images=varied_images[0].parent, count=4,
                                            cache_dir=cache_dir))
    second = again.metadata["calibration"]
    assert second["key"] == first["key"] and second["cache"] == "hit"
    assert second["images_read"] == 0
    scales = [{i.name: onnx.numpy_helper.to_array(i).tolist()
               for i in onnx.load(str(p)).graph.initializer if i.name.endswith("_scale")}
              for p in (fixture_onnx(variant="decoded", precision="int8").path, again.path)]
    assert scales[0] and scales[0] == scales[1]
    # another method is another calibration
    other = CalibrationSettings(images=varied_images[0].parent, count=4, method="entropy",
                                cache_dir=cache_dir)
    third = export_onnx(fixture_model, tmp_path / "entropy.onnx",
                        ExportSettings(variant="decoded", precision="int8"), other)
    assert third.metadata["calibration"]["key"] != first["key"]
    assert third.metadata["calibration"]["cache"] == "miss"


@pytest.mark.parametrize("fields, message", [
    ({"variant": "end2end"}, "--nms"),
    ({"variant": "raw", "nms": "efficient"}, "end2end only"),
    ({"opset": 9}, "--opset 9"),
    ({"variant": "sideways"}, "unknown variant"),
    ({"precision": "int4"}, "unknown precision"),
    ({"precision": "int8"}, "--calib"),
    ({"batch": 0}, "--batch"),
    ({"input_size": (300, 320)}, "multiple of 32"),
    ({"variant": "end2end", "nms": "onnx", "iou_threshold": 1.5}, "--iou-threshold"),
])
def test_bad_settings_are_user_errors(fixture_model, tmp_path, fields, message):
    with pytest.raises(UserError, match=re.escape(message)):
        export_onnx(fixture_model, tmp_path / "x.onnx", ExportSettings(**fields))
    assert not (tmp_path / "x.onnx").exists()


def test_simplify_needs_onnxsim_or_simplifies(fixture_model, tmp_path):
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="onnxsim"):
            export_onnx(fixture_model, tmp_path / "s.onnx", ExportSettings(simplify=True))
    else:
        result = export_onnx(fixture_model, tmp_path / "s.onnx", ExportSettings(simplify=True))
        assert result.metadata["simplified"] is True


def test_pre_topk_notes(fixture_model, tmp_path):
    from harness.export.onnx_export import resolve_nms

    nms, notes = resolve_nms(fixture_model, ExportSettings(variant="end2end", nms="batched",
                                                           keep_topk=5000, pre_topk=10000))
    assert nms.pre_topk == 4096
    assert any("clamped" in n for n in notes) and any("no detections" in n for n in notes)
    nms, notes = resolve_nms(fixture_model, ExportSettings(variant="end2end", nms="efficient",
                                                           pre_topk=100))
    assert nms.pre_topk is None and any("ignored" in n for n in notes)
