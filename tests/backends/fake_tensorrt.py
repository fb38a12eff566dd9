"""A stand-in `tensorrt` module whose ONNX parser mirrors any ONNX graph (one layer per node,
tensors named after the ONNX tensors, as onnx-tensorrt names them), recording what each build
marks; and stand-ins for a loaded deployed engine and loaded debug engines that count how many
are alive. For the chunked-marking tests (test_tensorrt_marking.py, tests/align/
test_marking*.py); the shapes of the calls follow test_tensorrt_build_calls.py's fake and
docs/tensorrt-api.md. Nothing here runs TensorRT."""
from __future__ import annotations

import types
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from harness.backends import tensorrt_build
from harness.backends.tensorrt_sidecar import read_sidecar

NMS_OP = "EfficientNMS_TRT"
BOXES, SCORES = "/head/boxes/Relu_output_0", "/head/scores/Sigmoid_output_0"
NMS_OUTPUTS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
INT_OUTPUTS = ("num_detections", "detection_classes")


def layer_name(i: int) -> str:
    return f"/backbone/layer{i}/Relu"


def layer_tensor(i: int) -> str:
    return f"/backbone/layer{i}/Relu_output_0"


def chain_onnx(path: Path, layers: int, nms: bool = False) -> Path:
    """images → `layers` Relu nodes in a chain (module-scoped names) → out; with `nms`, a box
    branch and a score branch feeding an EfficientNMS_TRT node whose outputs are the graph's."""
    shape = ["batch", 3, 8, 8]
    nodes = []
    prev = "images"
    for i in range(layers):
        nodes.append(helper.make_node("Relu", [prev], [layer_tensor(i)], name=layer_name(i)))
        prev = layer_tensor(i)
    if nms:
        nodes += [helper.make_node("Relu", [prev], [BOXES], name="/head/boxes/Relu"),
                  helper.make_node("Sigmoid", [prev], [SCORES], name="/head/scores/Sigmoid"),
                  helper.make_node(NMS_OP, [BOXES, SCORES], list(NMS_OUTPUTS), name="/nms",
                                   domain="TRT", score_threshold=0.25, iou_threshold=0.45,
                                   max_output_boxes=10, background_class=-1,
                                   score_activation=0, box_coding=0)]
        outputs = [helper.make_tensor_value_info(
            n, TensorProto.INT32 if n in INT_OUTPUTS else TensorProto.FLOAT, None)
            for n in NMS_OUTPUTS]
    else:
        nodes.append(helper.make_node("Relu", [prev], ["out"], name="/head/Relu"))
        outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              outputs)
    onnx.save(helper.make_model(graph), str(path))
    return path


class Enum(types.SimpleNamespace):
    """A pybind11 enum member: named by `.name`."""


class Tensor:
    def __init__(self, name, dtype="FLOAT", is_input=False):
        self.name, self.shape, self.dtype = name, (-1, 3, 8, 8), Enum(name=dtype)
        self.is_network_input, self.is_network_output = is_input, False
        self.is_shape_tensor = False


class Layer:
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
        self.layers, self.inputs, self.outputs, self.marked = [], [], [], []

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
        tensor.is_network_output = True
        self.outputs.append(tensor)
        self.marked.append(tensor.name)


def fake_trt(version: str = "10.13.0"):
    """(module, builds): `builds` gets, per build_serialized_network call, the tensor names
    that build marked, in the order mark_output was called."""
    builds: list[list[str]] = []

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            graph = onnx.load(path).graph
            tensors = {}
            for value in graph.input:
                tensors[value.name] = Tensor(value.name, is_input=True)
                self.network.inputs.append(tensors[value.name])
            for node in graph.node:
                outs = [Tensor(o, "INT32" if o in INT_OUTPUTS else "FLOAT")
                        for o in node.output]
                tensors.update({t.name: t for t in outs})
                self.network.layers.append(Layer(
                    node.name, "PLUGIN_V2" if node.domain == "TRT" else "ACTIVATION",
                    [tensors[i] for i in node.input], outs))
            for value in graph.output:
                tensors[value.name].is_network_output = True
                self.network.outputs.append(tensors[value.name])
            return True

    class Config:
        def set_memory_pool_limit(self, pool, size): pass
        def add_optimization_profile(self, profile): pass
        def set_flag(self, flag): pass
        def clear_flag(self, flag): pass
        def create_timing_cache(self, data): return types.SimpleNamespace(data=bytes(data))
        def set_timing_cache(self, cache, ignore_mismatch): return True
        def get_timing_cache(self): return types.SimpleNamespace(serialize=lambda: b"timings")

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): return Network()
        def create_builder_config(self): return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *shapes: None)

        def build_serialized_network(self, network, config):
            builds.append(list(network.marked))
            return b"PLAN"

    class Logger:
        WARNING = "warning"
        def __init__(self, level): pass

    trt = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        init_libnvinfer_plugins=lambda logger, namespace: None,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=types.SimpleNamespace(TF32="TF32", FP16="FP16", INT8="INT8"))
    return trt, builds


def use_fake_trt(monkeypatch, version: str = "10.13.0"):
    """Install the fake for tensorrt_build; returns its `builds` list."""
    trt, builds = fake_trt(version)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: ("Test GPU", "9.0"))
    return builds


def tensor_value(name: str, inputs: np.ndarray) -> np.ndarray:
    """What every backend here computes for tensor `name`: a fixed scale of the input."""
    return inputs * (1 + sum(map(ord, name)) % 7)


def final_outputs(output_names, inputs: np.ndarray, scale: float = 1.0) -> dict:
    out = {}
    for name in output_names:
        if name in INT_OUTPUTS:
            out[name] = np.full((inputs.shape[0], 1), 3, np.int32)
        else:
            out[name] = tensor_value(name, inputs) * scale
    return out


class FakeDeployed:
    """A loaded TensorRTBackend of the deployed engine (built with the fake): its sidecar, its
    path, its outputs."""

    def __init__(self, engine_path: Path):
        self.path = Path(engine_path)
        self.sidecar = read_sidecar(self.path)
        self.device_id = 0
        self.runs = 0

    def infer(self, inputs):
        self.runs += 1
        return final_outputs(self.sidecar.outputs, inputs)


class FakeDebugEngines:
    """open_engine for ChunkedDebugEngines: loads a debug engine from its sidecar; `drift`
    (first marked tensor → how much its final outputs move) sets what marking does to it.
    Fails the test when a second engine is opened while one is alive."""

    def __init__(self, drift: Optional[dict] = None):
        self.drift = drift or {}
        self.alive: list[Path] = []
        self.opened: list[Path] = []
        self.most_alive = 0

    def __call__(self, path: Path, device_id: int = 0):
        assert not self.alive, f"{path.name} opened while {self.alive[0].name} is alive"
        engine = _FakeDebugEngine(self, Path(path))
        self.alive.append(engine.path)
        self.opened.append(engine.path)
        self.most_alive = max(self.most_alive, len(self.alive))
        return engine


class _FakeDebugEngine:
    def __init__(self, owner: FakeDebugEngines, path: Path):
        self.owner, self.path = owner, path
        side = read_sidecar(path)
        self.marked = list(side.build["layer_tensors"])
        self.outputs = [n for n in side.outputs if n not in side.marked_layers]
        self.scale = 1.0 + owner.drift.get(self.marked[0] if self.marked else None, 0.0)
        self.runs = 0

    def run_marked(self, inputs, names):
        assert self.path in self.owner.alive, "run after unload"
        missing = [n for n in names if n not in self.marked]
        assert not missing, f"{self.path.name} does not mark {missing}"
        self.runs += 1
        return (final_outputs(self.outputs, inputs, self.scale),
                {n: tensor_value(n, inputs) for n in names})

    def unload(self):
        self.owner.alive.remove(self.path)
