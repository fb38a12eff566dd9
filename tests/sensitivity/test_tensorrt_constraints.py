"""The chosen fp32 set as TensorRT per-layer precision constraints, through build_engine and
`harness build --fp32-layers` against the fake `tensorrt` (tests/backends/fake_tensorrt.py):
the layers under the prefixes get `precision` and their float outputs' types set to fp32 and
the build obeys them; Q/DQ and shape layers sharing the prefix are left alone; an fp32
engine or a strongly typed TensorRT 11 network needs none; a prefix the ONNX lacks fails
before TensorRT is loaded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harness.backends import tensorrt_build
from harness.backends.tensorrt_sidecar import read_sidecar
from harness.cli import main
from harness.errors import UserError
from harness.sensitivity.constraints import read_constraints, write_constraints
from harness.sensitivity.groups import LayerGroup

from tests.backends.fake_tensorrt import fake_trt

RELU_OUT = "/backbone/act/Relu_output_0"


def mixed_onnx(path: Path) -> Path:
    """images → Q/DQ → backbone Conv + Relu (kept fp32: no Q/DQ on the conv's weight) → Q/DQ
    named after the backbone's tensor (as onnxruntime names them) → head Conv + Relu → out,
    and a Shape node in the backbone's scope."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 8, 8])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("z", TensorProto.INT8, [], [0]),
             numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w1"),
             numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w2")]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q0"],
                         name="images_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["dq0"],
                         name="images_DequantizeLinear"),
        helper.make_node("Conv", ["dq0", "w1"], ["c1"], name="/backbone/conv/Conv"),
        helper.make_node("Relu", ["c1"], [RELU_OUT], name="/backbone/act/Relu"),
        helper.make_node("Shape", [RELU_OUT], ["shape"], name="/backbone/Shape"),
        helper.make_node("QuantizeLinear", [RELU_OUT, "s", "z"], ["q1"],
                         name=f"{RELU_OUT}_QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["dq1"],
                         name=f"{RELU_OUT}_DequantizeLinear"),
        helper.make_node("Conv", ["dq1", "w2"], ["c2"], name="/head/conv/Conv"),
        helper.make_node("Relu", ["c2"], ["out"], name="/head/act/Relu"),
    ]
    graph = helper.make_graph(nodes, "mixed", [x], [y], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def fake(monkeypatch):
    def install(version="10.13.0"):
        trt, _ = fake_trt(version)
        monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: ("Test GPU", "9.0"))
        return trt
    return install


def layers(trt) -> dict:
    return {layer.name: layer for layer in trt.networks[-1].layers}


def test_layers_under_the_prefixes_are_kept_fp32(fake, tmp_path):
    trt = fake()
    result = tensorrt_build.build_engine(mixed_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                         precision="int8", fp32_layers=["/backbone/"])
    by_name = layers(trt)
    for name in ("/backbone/conv/Conv", "/backbone/act/Relu"):
        assert by_name[name].precision is trt.float32
        assert by_name[name].output_types == {0: trt.float32}
    for name in (f"{RELU_OUT}_QuantizeLinear", f"{RELU_OUT}_DequantizeLinear",
                 "/backbone/Shape", "/head/conv/Conv", "/head/act/Relu"):
        assert by_name[name].precision is None and by_name[name].output_types == {}, name
    assert trt.flags == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    assert result.sidecar.build["fp32_layers"] == {
        "prefixes": ["/backbone/"], "layers": ["/backbone/conv/Conv", "/backbone/act/Relu"]}
    assert any("2 layers under 1 prefixes kept in fp32" in n for n in result.notes)


@pytest.mark.parametrize("version, precision, note", [
    ("10.13.0", "fp32", "an fp32 engine keeps every layer in fp32 already"),
    ("11.0.0", "int8", "strongly typed"),
])
def test_no_constraints_where_they_mean_nothing(fake, tmp_path, version, precision, note):
    trt = fake(version)
    result = tensorrt_build.build_engine(mixed_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                         precision=precision, fp32_layers=["/backbone/"])
    assert all(layer.precision is None for layer in trt.networks[-1].layers)
    assert "OBEY_PRECISION_CONSTRAINTS" not in trt.flags
    assert any(note in n for n in result.notes)
    assert result.sidecar.build["fp32_layers"]["layers"] == []


def test_a_prefix_the_onnx_lacks_fails_before_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setattr(tensorrt_build, "import_tensorrt",
                        lambda: pytest.fail("tensorrt looked up before the prefixes were checked"))
    with pytest.raises(UserError, match=r"no node of m.onnx starts with '/neck/'"):
        tensorrt_build.build_engine(mixed_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                    precision="int8", fp32_layers=["/backbone/", "/neck/"])


def test_constraints_file_round_trip_and_bad_files(tmp_path):
    group = LayerGroup(name="backbone.stem", kind="ConvModule",
                       nodes=("/backbone/stem/conv/Conv", "/backbone/stem/activate/Mul"),
                       quantized=("/backbone/stem/conv/Conv",), prefix="/backbone/stem/")
    path = write_constraints(tmp_path / "fp32_layers.json", [group], "m_int8_mixed.onnx", "int8")
    doc = json.loads(path.read_text())
    assert doc["prefixes"] == ["/backbone/stem/"] and doc["precision"] == "fp32"
    assert doc["groups"] == [{"module": "backbone.stem", "prefix": "/backbone/stem/",
                              "nodes": 2}]
    assert "--fp32-layers fp32_layers.json" in doc["build"]
    assert read_constraints(path) == ["/backbone/stem/"]
    plain = tmp_path / "plain.json"
    plain.write_text('["/neck/", "/bbox_head/"]')
    assert read_constraints(plain) == ["/neck/", "/bbox_head/"]
    for text, match in [("{", "not readable JSON"), ('{"prefixes": [1]}', "list of layer"),
                        ('{"precision": "fp16", "prefixes": ["/a/"]}', "only fp32")]:
        plain.write_text(text)
        with pytest.raises(UserError, match=match):
            read_constraints(plain)
    with pytest.raises(UserError, match="not found"):
        read_constraints(tmp_path / "missing.json")


def test_harness_build_fp32_layers(fake, tmp_path, capsys):
    trt = fake()
    onnx_path = mixed_onnx(tmp_path / "m.onnx")
    constraints = tmp_path / "fp32_layers.json"
    constraints.write_text(json.dumps({"format": 1, "precision": "fp32",
                                       "prefixes": ["/head/"]}))
    engine = tmp_path / "m.engine"
    code = main(["build", str(onnx_path), "-o", str(engine), "--precision", "int8",
                 "--fp32-layers", str(constraints), "--force"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 layers under 1 prefixes kept in fp32" in out
    assert read_sidecar(engine).build["fp32_layers"]["layers"] == ["/head/conv/Conv",
                                                                    "/head/act/Relu"]
    assert layers(trt)["/head/conv/Conv"].precision is trt.float32
    constraints.write_text('"/head/"')
    code = main(["build", str(onnx_path), "-o", str(engine), "--fp32-layers",
                 str(constraints)])
    assert code == 2 and "list of layer-name prefixes" in capsys.readouterr().err
