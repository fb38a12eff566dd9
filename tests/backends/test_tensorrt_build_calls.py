"""build_engine against a recording stand-in for the `tensorrt` module. The stand-in keeps the
shape of the real bindings (TensorRT 10.0-10.13 python/src/infer/pyCore.cpp, pyGraph.cpp,
parsers/pyOnnx.cpp; docs/tensorrt-api.md): explicit batch only before 10, one profile, precision
flags per version (none on 11, which is strongly typed), TF32 cleared, a timing cache that can
be refused, ONNX tensors (not layers) marked, parser errors node by node, a calibrator whose
errors the bindings would swallow. The real API is exercised by test_tensorrt_runtime.py where
TensorRT is installed."""
from __future__ import annotations

import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from harness.backends import tensorrt_build
from harness.backends.tensorrt_sidecar import read_sidecar
from harness.errors import UserError

RELU_OUT = "/backbone/stem/Relu_output_0"
MUL_OUT = "/backbone/stem/Mul_output_0"
SHAPE_OUT = "/backbone/stem/Shape_output_0"
CONST_OUT = "/backbone/stem/Constant_output_0"
CONST_LAYER_OUT = "(Unnamed Layer* 1) [Constant]_output"


def tiny_onnx(path: Path, qdq: bool = False, plugin: str = "", extra_input: str = "") -> Path:
    """images → Relu → Mul(Constant) → Relu → out, with a Shape node on the side (the ONNX
    node names PyTorch's exporter gives, scoped by module)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 8, 8])
    first = "images"
    nodes = []
    inits = []
    if qdq:
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                 helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"], name="/q"),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="/dq")]
        first = "dq"
    nodes += [
        helper.make_node("Constant", [], [CONST_OUT], name="/backbone/stem/Constant",
                         value=helper.make_tensor("c", TensorProto.FLOAT, [], [2.0])),
        helper.make_node("Relu", [first], [RELU_OUT], name="/backbone/stem/Relu"),
        helper.make_node("Mul", [RELU_OUT, CONST_OUT], [MUL_OUT], name="/backbone/stem/Mul"),
        helper.make_node("Shape", [MUL_OUT], [SHAPE_OUT], name="/backbone/stem/Shape"),
        helper.make_node("Relu", [MUL_OUT], ["out"], name="/head/Relu"),
    ]
    if plugin:
        nodes.append(helper.make_node(plugin, [MUL_OUT, RELU_OUT], ["dets"], name="/nms",
                                      domain="TRT"))
    inputs = [x]
    if extra_input:  # a second input the graph reads (a two-stage graph's img_shape)
        inputs.append(helper.make_tensor_value_info(extra_input, TensorProto.FLOAT,
                                                    ["batch", 2]))
        nodes.append(helper.make_node("Identity", [extra_input], ["shape_copy"],
                                      name="/shape_copy"))
    graph = helper.make_graph(nodes, "g", inputs, [y], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


class Enum(types.SimpleNamespace):
    """A pybind11 enum member: compared by identity, named by `.name`."""


def dtype(name):
    return Enum(name=name)


def fake_trt(version: str, parse_ok: bool = True, cache_fits: bool = True):
    """(module, calls): the calls build_engine makes, in order, as tuples."""
    calls: list[tuple] = []

    class Tensor:
        def __init__(self, name, shape, type_="FLOAT", is_input=False, is_shape=False):
            self.name, self.shape, self.dtype = name, shape, dtype(type_)
            self.is_network_output, self.is_network_input = False, is_input
            self.is_shape_tensor = is_shape

    class Layer:
        """The layers the ONNX parser makes for tiny_onnx: the node's name on its first layer,
        name_N on the next, the ONNX tensor name on the node's last output
        (onnx-tensorrt ImporterContext.cpp registerLayer / registerTensor)."""

        def __init__(self, name, type_, inputs, outputs):
            self.name, self.type = name, Enum(name=type_)
            self._in, self._out = inputs, outputs

        num_inputs = property(lambda self: len(self._in))
        num_outputs = property(lambda self: len(self._out))

        def get_input(self, j):
            return self._in[j]

        def get_output(self, j):
            return self._out[j]

    class Network:
        def __init__(self):
            images = Tensor("images", (-1, 3, 8, 8), is_input=True)
            relu = Tensor(RELU_OUT, (-1, 3, 8, 8))
            const = Tensor(CONST_LAYER_OUT, (1, 1, 1, 1))
            mul = Tensor(MUL_OUT, (-1, 3, 8, 8))
            shape = Tensor(SHAPE_OUT, (4,), "INT64", is_shape=True)
            out = Tensor("out", (-1, 3, 8, 8))
            out.is_network_output = True
            self.layers = [Layer("/backbone/stem/Relu", "ACTIVATION", [images], [relu]),
                           Layer("/backbone/stem/Mul", "CONSTANT", [], [const]),
                           Layer("/backbone/stem/Mul_1", "ELEMENTWISE", [relu, const], [mul]),
                           Layer("/backbone/stem/Shape", "SHAPE", [mul], [shape]),
                           Layer("/head/Relu", "ACTIVATION", [mul], [out])]
            self.inputs, self.outputs = [images], [out]

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

        def mark_output(self, tensor):
            calls.append(("mark_output", tensor.name))
            tensor.is_network_output = True
            self.outputs.append(tensor)

    class Error:
        def __init__(self, i):
            self.i = i

        def node(self): return self.i
        def node_name(self): return f"/n{self.i}"
        def node_operator(self): return "EfficientNMS_TRT"
        def desc(self): return f"problem {self.i}"
        def code(self): return "UNSUPPORTED_NODE"

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 2

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return parse_ok

        def get_error(self, i):
            return Error(i)

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls.append(("set_shape", name, tuple(mn), tuple(opt), tuple(mx)))

    class Config:
        def set_memory_pool_limit(self, pool, size): calls.append(("workspace", pool, size))
        def add_optimization_profile(self, p): calls.append(("add_optimization_profile",))
        def set_flag(self, f): calls.append(("set_flag", f))
        def clear_flag(self, f): calls.append(("clear_flag", f))
        def set_calibration_profile(self, p): calls.append(("set_calibration_profile",))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return types.SimpleNamespace(data=bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.data, ignore_mismatch))
            return cache_fits or cache.data == b""

        def get_timing_cache(self): return types.SimpleNamespace(serialize=lambda: b"timings")

        @property
        def int8_calibrator(self):
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, c):
            calls.append(("int8_calibrator",))
            self._calibrator = c

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): calls.append(("create_network", flags)); return Network()
        def create_builder_config(self): self.config = Config(); return self.config
        def create_optimization_profile(self): return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            calibrator = getattr(config, "_calibrator", None)
            if calibrator is not None:  # TensorRT asks for batches until None
                while calibrator.get_batch(["images"]) is not None:
                    pass
            return b"PLAN"

    class Logger:
        WARNING = "warning"
        def __init__(self, level): pass

    class ILogger:  # the base of the harness's one logger (tensorrt_build.shared_logger)
        INTERNAL_ERROR, ERROR, WARNING = "internal_error", "error", "warning"
        def __init__(self): pass

    class IInt8EntropyCalibrator2:
        def __init__(self): calls.append(("calibrator_base_init",))

    major = int(version.split(".")[0])
    flags = ["TF32"] + (["FP16", "INT8"] if major < 11 else [])  # 11.0 removed FP16 / INT8
    trt = types.SimpleNamespace(
        __version__=version, Logger=Logger, ILogger=ILogger, Builder=Builder,
        OnnxParser=Parser,
        init_libnvinfer_plugins=lambda logger, ns: calls.append(("init_plugins", ns)),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=types.SimpleNamespace(**{f: f for f in flags}))
    if major < 11:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt, calls


@pytest.fixture
def here(monkeypatch):
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: ("Test GPU", "9.0"))


def use(monkeypatch, trt):
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)


@pytest.mark.parametrize("version, flags", [("10.13.0", 0), ("10.0.1", 0), ("8.6.1", 1)])
def test_build_calls_and_sidecar(here, monkeypatch, tmp_path, version, flags):
    trt, calls = fake_trt(version)
    use(monkeypatch, trt)
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    result = tensorrt_build.build_engine(onnx_path, tmp_path / "m.engine", precision="fp16",
                                         workspace_gb=1, timing_cache=tmp_path / "t.cache",
                                         mark_layers=["backbone.stem"])
    assert calls[0] == ("init_plugins", "") and ("create_network", flags) in calls
    assert ("set_shape", "images", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8)) in calls
    assert ("set_flag", "FP16") in calls and ("clear_flag", "TF32") in calls
    assert ("set_flag", "INT8") not in calls
    assert ("workspace", "WORKSPACE", 1 << 30) in calls
    assert ("create_timing_cache", b"") in calls and ("set_timing_cache", b"", False) in calls
    # marking comes after the config, before the build
    assert calls.index(("mark_output", RELU_OUT)) < calls.index(("build_serialized_network",))
    assert (tmp_path / "m.engine").read_bytes() == b"PLAN"
    assert (tmp_path / "t.cache").read_bytes() == b"timings"
    side = read_sidecar(tmp_path / "m.engine")
    assert side == result.sidecar and side.tensorrt_version == version
    assert side.gpu_name == "Test GPU" and side.build["tf32"] is False
    assert side.marked_layers == [RELU_OUT, MUL_OUT]
    assert side.outputs == {"out": [-1, 3, 8, 8], RELU_OUT: [-1, 3, 8, 8],
                            MUL_OUT: [-1, 3, 8, 8]}


def test_two_stage_img_shape_input_follows_the_batch_profile(here, monkeypatch, tmp_path):
    """A two-stage graph's second input, img_shape (B, 2), gets the images' batches in the
    same profile; any other second input is one line before TensorRT is imported."""
    trt, calls = fake_trt("10.13.0")
    use(monkeypatch, trt)
    onnx_path = tiny_onnx(tmp_path / "m.onnx", extra_input="img_shape")
    tensorrt_build.build_engine(onnx_path, tmp_path / "m.engine", precision="fp32",
                                workspace_gb=1)
    assert ("set_shape", "images", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8)) in calls
    assert ("set_shape", "img_shape", (1, 2), (4, 2), (4, 2)) in calls
    assert calls.index(("set_shape", "img_shape", (1, 2), (4, 2), (4, 2))) < \
        calls.index(("add_optimization_profile",))
    use(monkeypatch, None)  # must fail before TensorRT is needed
    other = tiny_onnx(tmp_path / "o.onnx", extra_input="scale")
    with pytest.raises(UserError, match="has inputs images, scale"):
        tensorrt_build.build_engine(other, tmp_path / "o.engine", precision="fp32")
    with pytest.raises(UserError, match="int8 calibration"):
        tensorrt_build.build_engine(onnx_path, tmp_path / "i.engine", precision="int8",
                                    calib_images=tmp_path, preprocess=object())


def test_marks_onnx_tensors_not_the_layers_named_after_the_node(here, monkeypatch, tmp_path):
    """The Mul node's first layer (named after it) is the parser's Constant; its output
    tensor comes from "/backbone/stem/Mul_1". Marking by tensor name gets the ONNX tensor
    onnxruntime also names; Shape / Constant outputs and folded tensors are left out, with
    the reason in the sidecar; a requested network output is given without being marked."""
    trt, calls = fake_trt("10.13.0")
    use(monkeypatch, trt)
    result = tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                         mark_layers=["/backbone/stem/Mul",
                                                      "/backbone/stem/Shape",
                                                      "/backbone/stem/Constant", "/head/Relu"])
    marks = [c[1] for c in calls if c[0] == "mark_output"]
    assert marks == [MUL_OUT] and CONST_LAYER_OUT not in marks
    side = result.sidecar
    assert side.marked_layers == [MUL_OUT]
    assert side.build["layer_tensors"] == [MUL_OUT, "out"]
    assert set(side.build["unmarked"]) == {CONST_OUT, SHAPE_OUT}
    assert "SHAPE" in side.build["unmarked"][SHAPE_OUT]
    assert "not in the TensorRT network" in side.build["unmarked"][CONST_OUT]
    assert any("1 ONNX tensors marked" in n and "2 left unmarked" in n for n in result.notes)


def test_unknown_mark_request_fails_before_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setattr(tensorrt_build, "import_tensorrt",
                        lambda: pytest.fail("tensorrt looked up before --mark was checked"))
    with pytest.raises(UserError, match="no ONNX node matches 'backbone.stage9'"):
        tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                    mark_layers=["backbone.stage9"])


def test_mark_tensor_outputs_skips_int_and_shape_tensors():
    trt, _ = fake_trt("10.13.0")
    network = trt.Builder(None).create_network(0)
    network.layers[0].get_output(0).dtype = dtype("INT32")
    marked, available, unmarked = tensorrt_build.mark_tensor_outputs(
        network, [RELU_OUT, SHAPE_OUT, "images", "nowhere"])
    assert marked == [] and available == []
    assert "INT32" in unmarked[RELU_OUT] and "SHAPE" in unmarked[SHAPE_OUT]
    assert unmarked["images"] == "a network input" and "nowhere" in unmarked


@pytest.mark.parametrize("version, precision, qdq, set_flags", [
    ("10.13.0", "fp32", False, []),
    ("10.13.0", "fp16", False, ["FP16"]),
    ("10.13.0", "int8", True, ["FP16", "INT8"]),
    ("11.0.0", "fp32", False, []),
    ("11.0.0", "int8", True, []),  # strongly typed: the Q/DQ nodes decide, no flags exist
])
def test_precision_flags_per_version(here, monkeypatch, tmp_path, version, precision, qdq,
                                     set_flags):
    trt, calls = fake_trt(version)
    use(monkeypatch, trt)
    result = tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx", qdq=qdq),
                                         tmp_path / "m.engine", precision=precision)
    assert [c[1] for c in calls if c[0] == "set_flag"] == set_flags
    assert ("clear_flag", "TF32") in calls and ("int8_calibrator",) not in calls
    assert ("create_network", 0) in calls and result.sidecar.build["explicit_int8"] is qdq


def test_tensorrt_11_refuses_a_precision_the_onnx_does_not_have(here, monkeypatch, tmp_path):
    trt, calls = fake_trt("11.0.0")
    use(monkeypatch, trt)
    with pytest.raises(UserError, match=r"only strongly typed networks.*fp32 engine, not fp16"):
        tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                    precision="fp16")
    assert ("build_serialized_network",) not in calls


def test_tensorrt_11_refuses_the_removed_batched_nms_plugin(here, monkeypatch, tmp_path):
    trt, calls = fake_trt("11.0.0")
    use(monkeypatch, trt)
    onnx_path = tiny_onnx(tmp_path / "m.onnx", plugin="BatchedNMSDynamic_TRT")
    with pytest.raises(UserError, match="BatchedNMSDynamic_TRT, which TensorRT 11.0 removed"):
        tensorrt_build.build_engine(onnx_path, tmp_path / "m.engine")
    assert calls == []
    trt, calls = fake_trt("10.13.0")  # deprecated there, still built
    use(monkeypatch, trt)
    tensorrt_build.build_engine(onnx_path, tmp_path / "m.engine")
    assert ("build_serialized_network",) in calls


def test_timing_cache_from_another_gpu_is_replaced(here, monkeypatch, tmp_path):
    trt, calls = fake_trt("10.13.0", cache_fits=False)
    use(monkeypatch, trt)
    (tmp_path / "t.cache").write_bytes(b"other gpu")
    result = tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                         timing_cache=tmp_path / "t.cache")
    assert [c for c in calls if c[0] == "set_timing_cache"] == [
        ("set_timing_cache", b"other gpu", False), ("set_timing_cache", b"", False)]
    assert any("does not fit this GPU" in n for n in result.notes)
    assert (tmp_path / "t.cache").read_bytes() == b"timings"


def test_calibration_error_is_raised_not_swallowed(here, monkeypatch, tmp_path):
    """The bindings print an exception from get_batch and end calibration as if the data ran
    out (pyInt8.cpp); build_engine must fail with it instead of building a half-calibrated
    engine."""
    pytest.importorskip("torch")
    trt, calls = fake_trt("10.13.0")
    use(monkeypatch, trt)
    preprocess = types.SimpleNamespace(pad_value=114.0)
    images = [tmp_path / "broken.jpg"]
    images[0].write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"calibration of m.onnx stopped at batch 1 of 1: "
                                        r"cannot decode image"):
        tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                    precision="int8", calib_images=images,
                                    preprocess=preprocess, calib_cache_dir=tmp_path / "calib",
                                    calib_batch_size=2)
    assert ("calibrator_base_init",) in calls and ("set_calibration_profile",) in calls
    # the calibration profile is the calibrator's batch, padded to min(batch size, max batch)
    assert ("set_shape", "images", (2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 8, 8)) in calls
    assert ("set_flag", "INT8") in calls and not (tmp_path / "m.engine").exists()


def test_parser_errors_printed_node_by_node(here, monkeypatch, tmp_path, capsys):
    trt, _ = fake_trt("10.13.0", parse_ok=False)
    use(monkeypatch, trt)
    with pytest.raises(UserError, match=r"cannot parse m.onnx \(2 error\(s\)\); first: node 0"):
        tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine")
    err = capsys.readouterr().err.splitlines()
    assert err == ["  node 0 /n0 (EfficientNMS_TRT): problem 0 [UNSUPPORTED_NODE]",
                   "  node 1 /n1 (EfficientNMS_TRT): problem 1 [UNSUPPORTED_NODE]"]
    assert not (tmp_path / "m.engine").exists()


def test_int8_without_qdq_needs_calibration_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt_build, "import_tensorrt",
                        lambda: pytest.fail("tensorrt looked up before the options were checked"))
    with pytest.raises(UserError, match="no Q/DQ nodes, so int8 needs calibration"):
        tensorrt_build.build_engine(tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine",
                                    precision="int8")
    with pytest.raises(UserError, match="static batch|min <= opt"):
        tensorrt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", min_batch=3,
                                    opt_batch=2)



@pytest.mark.parametrize("op, drop", [("EfficientNMS_TRT", "box_coding"),
                                      ("EfficientNMS_TRT", "background_class"),
                                      ("BatchedNMSDynamic_TRT", "numClasses"),
                                      ("BatchedNMS_TRT", "shareLocation")])
def test_plugin_emulation_requires_what_the_plugin_creator_requires(op, drop):
    """EfficientNMSPluginCreator / BatchedNMS*PluginCreator::createPlugin call
    validateRequiredAttributesExist (TensorRT 8.6.1 - 10.13): a node TensorRT would refuse
    is refused by the onnxruntime emulation too, instead of run with a guessed default."""
    from harness.nms.plugin_nodes import (BATCHED_NMS_REQUIRED, EFFICIENT_NMS_REQUIRED,
                                              PLUGIN_KERNELS)

    required = EFFICIENT_NMS_REQUIRED if op == "EfficientNMS_TRT" else BATCHED_NMS_REQUIRED
    attrs = {name: 1 for name in required if name != drop}
    node = helper.make_node(op, ["boxes", "scores"], ["n", "b", "s", "c"], name="/nms",
                            domain="TRT", **attrs)
    with pytest.raises(UserError, match=f"{op} node '/nms' lacks attribute\\(s\\) {drop}"):
        PLUGIN_KERNELS[("TRT", op)](node, [None, None])
