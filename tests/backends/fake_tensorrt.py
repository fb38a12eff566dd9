"""A stand-in `tensorrt` module whose ONNX parser mirrors any ONNX graph (one layer per node,
tensors named after the ONNX tensors, as onnx-tensorrt names them), recording what each build
marks; and stand-ins for a loaded deployed engine and loaded debug engines that count how many
are alive. For the chunked-marking tests (test_tensorrt_marking.py, tests/align/
test_marking*.py); the shapes of the calls follow test_tensorrt_build_calls.py's fake and
docs/tensorrt-api.md. Nothing here runs TensorRT.

Its runtime half (Runtime, ILogger, the engine API of docs/tensorrt-api.md) "deserializes" an
engine another tool built from bytes written by fake_engine_bytes: its I/O, shapes, dtypes,
optimization profiles and engine-inspector JSON, and no sidecar; bytes it cannot read give
the two ERROR log lines TensorRT gives (their form as in NVIDIA/TensorRT#3898 and #2195:
"1: [stdArchiveReader.cpp::...] Error Code 1: Serialization (...)", then "Engine
deserialization failed."; the texts are imitations) and None. For test_tensorrt_foreign.py
and tests/align/test_foreign_engine.py."""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Optional

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


# the LayerType the ONNX parser gives these nodes (others: ACTIVATION, plugins PLUGIN_V2)
LAYER_TYPES = {"Conv": "CONVOLUTION", "QuantizeLinear": "QUANTIZE",
               "DequantizeLinear": "DEQUANTIZE", "Shape": "SHAPE"}


class Tensor:
    def __init__(self, name, dtype="FLOAT", is_input=False):
        self.name, self.shape, self.dtype = name, (-1, 3, 8, 8), Enum(name=dtype)
        self.is_network_input, self.is_network_output = is_input, False
        self.is_shape_tensor = False


class Layer:
    def __init__(self, name, type_, inputs, outputs):
        self.name, self.type = name, Enum(name=type_)
        self._in, self._out = inputs, outputs
        # per-layer precision constraints (ILayer.precision, set_output_type)
        self.precision, self.output_types = None, {}

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype

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
    that build marked, in the order mark_output was called; the module's `flags` every
    BuilderFlag set and `networks` the network of each build (its layers' precision)."""
    builds: list[list[str]] = []
    flags: list[str] = []  # every BuilderFlag set, in order
    networks: list[Network] = []  # the network of each build

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
                    node.name, "PLUGIN_V2" if node.domain == "TRT" else
                    LAYER_TYPES.get(node.op_type, "ACTIVATION"),
                    [tensors[i] for i in node.input if i in tensors], outs))
            for value in graph.output:
                tensors[value.name].is_network_output = True
                self.network.outputs.append(tensors[value.name])
            return True

    class Config:
        def set_memory_pool_limit(self, pool, size): pass
        def add_optimization_profile(self, profile): pass
        def set_flag(self, flag): flags.append(flag)
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
            networks.append(network)
            return b"PLAN"

    class Logger:
        WARNING = "warning"
        def __init__(self, level): pass

    trt = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        init_libnvinfer_plugins=lambda logger, namespace: None,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=types.SimpleNamespace(
            TF32="TF32", FP16="FP16", INT8="INT8",
            OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS"),
        float32=Enum(name="FLOAT"), flags=flags, networks=networks)
    add_runtime(trt)
    return trt, builds


# -- the runtime: engines another tool built ---------------------------------------------------

FAKE_MAGIC = b"FAKE-TRT-PLAN\n"
FAKE_GPU = ("Test GPU", "9.0")


def fake_engine_bytes(io: list[dict[str, Any]], profiles: list[dict[str, list]],
                      layers: Optional[list[Any]] = None, verbosity: str = "LAYER_NAMES_ONLY",
                      built_with: str = "10.13.0", compute: str = "9.0") -> bytes:
    """A fake serialized engine: io [{name, mode input|output, shape (-1 dynamic), dtype}];
    profiles [{input name: [min, opt, max]}]; layers: the inspector's layer records (or
    names), shown in full only when `verbosity` is DETAILED (names only for
    LAYER_NAMES_ONLY, nothing for NONE), as TensorRT's inspector does; built_with / compute:
    the TensorRT version and compute capability it "needs"."""
    doc = {"io": io, "profiles": profiles, "layers": layers or [], "verbosity": verbosity,
           "built_with": built_with, "compute": compute}
    return FAKE_MAGIC + json.dumps(doc).encode()


def raw_engine_io(batch: int = -1, size: int = 8) -> list[dict[str, Any]]:
    """The I/O of a raw-head engine (one input, two head maps), batch -1 = dynamic."""
    return [{"name": "images", "mode": "input", "shape": [batch, 3, size, size],
             "dtype": "FLOAT"},
            {"name": "cls_scores.0", "mode": "output", "shape": [batch, 5, 1, 1],
             "dtype": "FLOAT"},
            {"name": "bbox_preds.0", "mode": "output", "shape": [batch, 4, 1, 1],
             "dtype": "HALF"}]


def nms_engine_io(batch: int = -1, size: int = 8) -> list[dict[str, Any]]:
    """The I/O of an end2end engine with EfficientNMS_TRT (chain_onnx(..., nms=True))."""
    return [{"name": "images", "mode": "input", "shape": [batch, 3, size, size],
             "dtype": "FLOAT"}] + [
        {"name": n, "mode": "output", "shape": [batch, 1] if n == "num_detections" else
         [batch, 10, 4] if n == "detection_boxes" else [batch, 10],
         "dtype": "INT32" if n in INT_OUTPUTS else "FLOAT"} for n in NMS_OUTPUTS]


def batch_profiles(lo: int = 1, opt: int = 4, hi: int = 4, size: int = 8,
                   name: str = "images") -> list[dict[str, list]]:
    return [{name: [[lo, 3, size, size], [opt, 3, size, size], [hi, 3, size, size]]}]


class FakeEngine:
    """An ICudaEngine's read side, as docs/tensorrt-api.md lists it."""

    def __init__(self, trt: Any, doc: dict[str, Any]):
        self._trt, self._doc = trt, doc
        self._io = {t["name"]: t for t in doc["io"]}
        self.profiling_verbosity = Enum(name=doc["verbosity"])
        self.contexts: list[FakeContext] = []

    num_io_tensors = property(lambda self: len(self._doc["io"]))
    num_optimization_profiles = property(lambda self: max(1, len(self._doc["profiles"])))

    def get_tensor_name(self, index: int) -> str:
        return self._doc["io"][index]["name"]

    def get_tensor_mode(self, name: str) -> Any:
        mode = self._trt.TensorIOMode
        return mode.INPUT if self._io[name]["mode"] == "input" else mode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._io[name]["shape"])

    def get_tensor_dtype(self, name: str) -> Enum:
        return Enum(name=self._io[name]["dtype"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert self._io[name]["mode"] == "input", "profile shapes are asked of inputs only"
        profiles = self._doc["profiles"]
        if not profiles:  # a static engine: what TensorRT answers is unconfirmed
            return []
        return [tuple(s) for s in profiles[profile_index][name]]

    def create_execution_context(self) -> "FakeContext":
        context = FakeContext(self)
        self.contexts.append(context)
        return context

    def create_engine_inspector(self) -> "FakeInspector":
        return FakeInspector(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.input_shapes = engine, {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        profile = self.engine._doc["profiles"][0][name] if self.engine._doc["profiles"] \
            else [self.engine._io[name]["shape"]] * 3
        ok = len(shape) == len(profile[0]) and all(
            lo <= s <= hi for lo, s, hi in zip(profile[0], shape, profile[2]))
        if ok:
            self.input_shapes[name] = tuple(shape)
        return ok


class FakeInspector:
    """IEngineInspector: get_engine_information(JSON) as the engine's verbosity allows."""

    def __init__(self, engine: FakeEngine):
        self.engine, self.execution_context = engine, None

    def get_engine_information(self, fmt: Any) -> str:
        assert fmt is self.engine._trt.LayerInformationFormat.JSON
        doc, verbosity = self.engine._doc, self.engine._doc["verbosity"]
        if verbosity == "NONE":
            return ""
        layers = doc["layers"]
        if verbosity != "DETAILED":
            layers = [layer["Name"] if isinstance(layer, dict) else layer for layer in layers]
        bindings = [t["name"] for t in doc["io"]]
        return json.dumps({"Layers": layers, "Bindings": bindings}, indent=2)


def add_runtime(trt: Any) -> None:
    """Give the fake module the runtime half: ILogger (subclassable, severities exported
    onto it), Runtime.deserialize_cuda_engine, and the enums the backend reads."""

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (
            Enum(name=n) for n in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"))

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            trt.runtimes.append(self)

        def deserialize_cuda_engine(self, data: bytes) -> Optional[FakeEngine]:
            data = bytes(data)
            error = None
            if not data.startswith(FAKE_MAGIC):
                error = ("1: [stdArchiveReader.cpp::StdArchiveReaderInitCommon::47] Error Code "
                         "1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG "
                         "failed.Magic tag does not match)")
            else:
                doc = json.loads(data[len(FAKE_MAGIC):])
                if doc["built_with"] != trt.__version__:
                    error = ("1: [stdArchiveReader.cpp::StdArchiveReaderInitCommon::46] Error "
                             "Code 1: Serialization (Serialization assertion stdVersionRead == "
                             "kSERIALIZATION_VERSION failed.Version tag does not match. Note: "
                             f"Current Version: {trt.__version__}, Serialized Engine Version: "
                             f"{doc['built_with']})")
                elif doc["compute"] != FAKE_GPU[1]:
                    error = ("6: The engine plan file is generated on an incompatible device, "
                             f"expecting compute {doc['compute']} got compute {FAKE_GPU[1]}, "
                             "please rebuild.")
            if error:
                self.logger.log(ILogger.ERROR, error)
                self.logger.log(ILogger.ERROR, "4: [runtime.cpp::deserializeCudaEngine::65] "
                                "Error Code 4: Internal Error (Engine deserialization failed.)")
                return None
            return FakeEngine(trt, doc)

    trt.ILogger = ILogger
    trt.Runtime = Runtime
    trt.runtimes = []
    trt.TensorIOMode = types.SimpleNamespace(INPUT=Enum(name="INPUT"),
                                             OUTPUT=Enum(name="OUTPUT"))
    trt.LayerInformationFormat = types.SimpleNamespace(ONELINE=Enum(name="ONELINE"),
                                                       JSON=Enum(name="JSON"))


def use_fake_runtime(monkeypatch, version: str = "10.13.0"):
    """The fake `tensorrt` for TensorRTBackend.load on a machine without CUDA: the module, the
    GPU FAKE_GPU, and the backend's two CUDA steps (device guard, stream) made no-ops.
    Returns the module (its `runtimes` lists every Runtime made)."""
    import contextlib

    from harness.backends.tensorrt_backend import TensorRTBackend

    trt, _ = fake_trt(version)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda device=0: FAKE_GPU)
    monkeypatch.setattr(TensorRTBackend, "_on_device", lambda self: contextlib.nullcontext())
    monkeypatch.setattr(TensorRTBackend, "_cuda_setup", lambda self: None)
    return trt


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

    def infer(self, inputs, metas=None):
        self.runs += 1
        return final_outputs(self.sidecar.outputs, inputs)

    def debug_build(self):
        from harness.backends.tensorrt_marking import DebugBuild

        return DebugBuild.of(self.sidecar)


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

    def run_marked(self, inputs, names, metas=None):
        assert self.path in self.owner.alive, "run after unload"
        missing = [n for n in names if n not in self.marked]
        assert not missing, f"{self.path.name} does not mark {missing}"
        self.runs += 1
        return (final_outputs(self.outputs, inputs, self.scale),
                {n: tensor_value(n, inputs) for n in names})

    def unload(self):
        self.owner.alive.remove(self.path)
