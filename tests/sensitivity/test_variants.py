"""Mixed-precision variants of the fixture's fp32 graph: int8 with a group's nodes left out of
Q/DQ (its convolutions read float activations and float weights, every other one Q/DQ'd),
fp16 with a group's weights left in float32, the file saying which groups stayed fp32, and
variant keys that name the set, not its order."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

from harness.errors import UserError
from harness.export.calibration import CalibrationSettings
from harness.export.quantize import QUANTIZED_OPS, to_int8
from harness.sensitivity.groups import derive_groups, model_modules
from harness.sensitivity.variants import Conversion


@pytest.fixture(scope="module")
def fixture_groups(fixture_model, fixture_onnx):
    proto = onnx.load(str(fixture_onnx(variant="raw").path))
    _, groups = derive_groups(model_modules(fixture_model.module),
                              [(n.name, n.op_type) for n in proto.graph.node], QUANTIZED_OPS,
                              "stage")
    return proto, {g.name: g for g in groups}


def producers(model):
    return {o: n.op_type for n in model.graph.node for o in n.output}


def test_int8_keeps_the_group_out_of_qdq(fixture_model, fixture_groups, varied_images,
                                         tmp_path):
    from harness.export.metadata import read_metadata

    proto, groups = fixture_groups
    calibration = CalibrationSettings(images=varied_images[0].parent, count=4,
                                      cache_dir=tmp_path / "calibration")
    conversion = Conversion(proto, "int8", fixture_model.preprocess, (320, 320), calibration,
                            {"fp32": "planted"})
    # convs_pred.0 reads the neck output downsample_layers.0 also reads (one Q/DQ pair
    # for both): it must still read the float tensor
    kept = [groups["backbone.stem"], groups["bbox_head.head_module.convs_pred.0"]]
    mixed = conversion.convert(kept)
    made_by = producers(mixed)
    fp32_convs = {n for g in kept for n in g.quantized}
    convs = [n for n in mixed.graph.node if n.op_type == "Conv"]
    assert len(convs) == 60
    for conv in convs:
        dq = [made_by.get(t) == "DequantizeLinear" for t in conv.input[:2]]
        assert dq == ([False, False] if conv.name in fp32_convs else [True, True]), conv.name
    shared = next(n for n in mixed.graph.node if n.name == "/neck/downsample_layers.0/conv/Conv")
    head = next(n for n in mixed.graph.node
                if n.name == "/bbox_head/head_module/convs_pred.0/Conv")
    dq = next(n for n in mixed.graph.node if n.output[0] == shared.input[0])
    q = next(n for n in mixed.graph.node if n.output[0] == dq.input[0])
    assert q.input[0] == head.input[0]  # the float tensor behind the neck conv's Q/DQ
    onnx.checker.check_model(mixed)
    meta = read_metadata(mixed)
    assert meta["precision"] == "int8"
    assert meta["mixed_precision"]["fp32_groups"] == ["backbone.stem",
                                                      "bbox_head.head_module.convs_pred.0"]
    assert meta["calibration"]["kept_fp32"]["nodes"] == sum(len(g.nodes) for g in kept)
    # one calibration for every variant: the second conversion read the ranges cached
    assert conversion.convert([])  # all groups int8
    assert len(list((tmp_path / "calibration").glob("int8-*.json"))) == 1
    assert conversion.key(kept) == conversion.key(kept[::-1]) != conversion.key(kept[:1])
    assert conversion.key([]) != conversion.key(kept[:1])


def test_fp16_keeps_the_group_weights_in_float32(fixture_model, fixture_groups):
    proto, groups = fixture_groups
    conversion = Conversion(proto, "fp16", fixture_model.preprocess, (320, 320))
    stage2 = groups["backbone.stage2"]
    mixed = conversion.convert([stage2])
    weights = {i.name: i.data_type for i in mixed.graph.initializer}
    convs = [n for n in mixed.graph.node if n.op_type == "Conv"]
    assert len(convs) == 60
    for conv in convs:
        expected = TensorProto.FLOAT if conv.name in stage2.quantized else TensorProto.FLOAT16
        assert weights[conv.input[1]] == expected, conv.name


def test_a_node_name_that_is_not_there_is_one_line(fixture_model, fixture_groups,
                                                   varied_images):
    proto, _ = fixture_groups
    calibration = CalibrationSettings(images=varied_images[0].parent, count=2)
    with pytest.raises(UserError, match=r"no ONNX node is named '/backbone/stage9/' or "
                                        r"starts with it"):
        to_int8(proto, fixture_model.preprocess, "images", (320, 320), calibration,
                keep_fp32=["/backbone/stage9/"])
