"""build_engine against a recording stand-in for the `tensorrt` module: the TensorRT 10 calls
it makes (plugins, explicit batch only before 10, profile, flags, TF32 cleared, timing cache,
marked layers) and parser errors reported node by node. The real API is exercised by
test_tensorrt_runtime.py where TensorRT is installed."""
from __future__ import annotations

import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from harness.backends import tensorrt_build
from harness.backends.tensorrt_sidecar import read_sidecar
from harness.errors import UserError


def tiny_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 8, 8])
    stem = helper.make_node("Relu", ["images"], ["/backbone/stem/Relu_output_0"],
                            name="/backbone/stem/Relu")
    graph = helper.make_graph([stem,
                               helper.make_node("Relu", ["/backbone/stem/Relu_output_0"],
                                                ["out"], name="/head/Relu")],
                              "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


def fake_trt(version: str, parse_ok: bool = True):
    calls: list[tuple] = []

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape, self.is_network_output = name, shape, False

    class Layer:
        def __init__(self, name, out):
            self.name, self.num_outputs, self._out = name, 1, out

        def get_output(self, j):
            return self._out

    class Network:
        def __init__(self):
            self.inputs = [Tensor("images", (-1, 3, 8, 8))]
            stem = Tensor("/backbone/stem/Relu_output_0", (-1, 3, 8, 8))
            out = Tensor("out", (-1, 3, 8, 8))
            out.is_network_output = True
            self.layers = [Layer("/backbone/stem/Relu", stem), Layer("/head/Relu", out)]
            self.outputs = [out]

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
        def set_memory_pool_limit(self, pool, size): calls.append(("workspace", size))
        def add_optimization_profile(self, p): calls.append(("add_optimization_profile",))
        def set_flag(self, f): calls.append(("set_flag", f))
        def clear_flag(self, f): calls.append(("clear_flag", f))
        def create_timing_cache(self, data): calls.append(("create_timing_cache", data)); return "tc"
        def set_timing_cache(self, c, ignore_mismatch): calls.append(("set_timing_cache",))
        def get_timing_cache(self): return types.SimpleNamespace(serialize=lambda: b"timings")

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): calls.append(("create_network", flags)); return Network()
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return Profile()
        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"PLAN"

    class Logger:
        WARNING = "warning"
        def __init__(self, level): pass

    trt = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        init_libnvinfer_plugins=lambda logger, ns: calls.append(("init_plugins", ns)),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32"))
    return trt, calls


@pytest.fixture
def here(monkeypatch):
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: ("Test GPU", "9.0"))


@pytest.mark.parametrize("version, flags", [("10.13.0", 0), ("8.6.1", 1)])
def test_build_calls_and_sidecar(here, monkeypatch, tmp_path, version, flags):
    trt, calls = fake_trt(version)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
    onnx_path = tiny_onnx(tmp_path / "m.onnx")
    result = tensorrt_build.build_engine(onnx_path, tmp_path / "m.engine", precision="fp16",
                                         workspace_gb=1, timing_cache=tmp_path / "t.cache",
                                         mark_layers=["backbone.stem"])
    assert ("init_plugins", "") in calls and ("create_network", flags) in calls
    assert ("set_shape", "images", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8)) in calls
    assert ("set_flag", "FP16") in calls and ("clear_flag", "TF32") in calls
    assert ("workspace", 1 << 30) in calls and ("create_timing_cache", b"") in calls
    assert ("mark_output", "/backbone/stem/Relu_output_0") in calls
    assert (tmp_path / "m.engine").read_bytes() == b"PLAN"
    assert (tmp_path / "t.cache").read_bytes() == b"timings"
    side = read_sidecar(tmp_path / "m.engine")
    assert side == result.sidecar and side.tensorrt_version == version
    assert side.marked_layers == ["/backbone/stem/Relu_output_0"]
    assert side.outputs == {"out": [-1, 3, 8, 8], "/backbone/stem/Relu_output_0": [-1, 3, 8, 8]}
    assert side.gpu_name == "Test GPU" and side.build["tf32"] is False


def test_parser_errors_printed_node_by_node(here, monkeypatch, tmp_path, capsys):
    trt, _ = fake_trt("10.13.0", parse_ok=False)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
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
