"""What a TensorRT engine says about itself when no harness sidecar came with it (an engine
`trtexec`, mmyolo's easydeploy or mmdeploy built): its I/O tensors and optimization profiles
(read through the TensorRT 10 engine API), the engine inspector's JSON (layer names, or
layer details when it was built with ProfilingVerbosity.DETAILED), and what the source ONNX,
when the user gives it, adds. From these it decides, and records, where the engine's NMS
settings and precision come from. Plain functions over plain data, tested without TensorRT;
only read_engine_io and the backend touch the engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from harness.backends.tensorrt_plan import BatchProfile
from harness.errors import UserError

# the warning a sidecar-less engine carries in describe() and prints once when loaded
NO_SIDECAR_WARNING = ("no harness sidecar: TensorRT version, GPU and source ONNX not checked; "
                      "I/O, shapes and profiles read from the engine")

# where a target's NMS settings (and what else a sidecar would have said) come from
SETTINGS_SOURCES = ("sidecar", "engine inspector", "source onnx", "assumed")

# The NMS plugins the harness replays (harness.nms.plugin_nodes.PLUGIN_KERNELS), longest
# name first so BatchedNMSDynamic_TRT is not read as BatchedNMS_TRT, with every attribute
# their creators take: the required ones (plugin_nodes.*_REQUIRED) and the optional ones
# the kernels read.
NMS_PLUGIN_FIELDS: dict[str, tuple[str, ...]] = {
    "BatchedNMSDynamic_TRT": ("shareLocation", "backgroundLabelId", "numClasses", "topK",
                              "keepTopK", "scoreThreshold", "iouThreshold", "isNormalized",
                              "clipBoxes", "scoreBits", "caffeSemantics", "plugin_version"),
    "EfficientNMS_TRT": ("score_threshold", "iou_threshold", "max_output_boxes",
                         "background_class", "score_activation", "box_coding",
                         "class_agnostic", "plugin_version"),
    "BatchedNMS_TRT": ("shareLocation", "backgroundLabelId", "numClasses", "topK",
                       "keepTopK", "scoreThreshold", "iouThreshold", "isNormalized",
                       "clipBoxes", "scoreBits", "caffeSemantics", "plugin_version"),
}


# NMS plugins of other tools, recognised but not replayed by the harness: mmdeploy's
# (`mmdeploy::TRTBatchedNMS` nodes, its libmmdeploy_tensorrt_ops plugins; tests/foreign/
# README.md), longest name first
OTHER_NMS_PLUGINS = ("TRTBatchedRotatedNMS", "TRTBatchedNMS")


def required_fields(op_type: str) -> tuple[str, ...]:
    """The attributes TensorRT's creator of `op_type` requires (harness.nms.plugin_nodes)."""
    from harness.nms.plugin_nodes import BATCHED_NMS_REQUIRED, EFFICIENT_NMS_REQUIRED

    if op_type == "EfficientNMS_TRT":
        return EFFICIENT_NMS_REQUIRED
    if op_type in ("BatchedNMSDynamic_TRT", "BatchedNMS_TRT"):
        return BATCHED_NMS_REQUIRED
    return ()


def replayed_ops() -> list[str]:
    """The plugin op types the harness replays: harness.nms.plugin_nodes.PLUGIN_KERNELS."""
    from harness.nms.plugin_nodes import PLUGIN_KERNELS

    return list(dict.fromkeys(op for _, op in PLUGIN_KERNELS))


# -- I/O and profiles ---------------------------------------------------------------------------

@dataclass(frozen=True)
class IOTensor:
    """One I/O tensor as the engine reports it: mode input | output; shape with -1 for each
    dynamic dim; dtype the TensorRT DataType name (FLOAT, HALF, INT32, ...)."""

    name: str
    mode: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "shape": list(self.shape),
                "dtype": self.dtype}


@dataclass(frozen=True)
class EngineIO:
    """An engine's I/O tensors in its own order, and per optimization profile the
    (min, opt, max) shapes of each input."""

    tensors: tuple[IOTensor, ...]
    profiles: tuple[dict[str, BatchProfile], ...]

    @property
    def inputs(self) -> list[IOTensor]:
        return [t for t in self.tensors if t.mode == "input"]

    @property
    def outputs(self) -> list[IOTensor]:
        return [t for t in self.tensors if t.mode == "output"]

    def profile(self, input_name: str, index: int = 0) -> BatchProfile:
        """The shapes `input_name` takes under profile `index` (an execution context uses
        profile 0 unless told otherwise)."""
        if not self.profiles:
            raise UserError("the engine reports no optimization profile")
        return self.profiles[index][input_name]

    def profiles_json(self) -> list[dict[str, dict[str, list[int]]]]:
        return [{name: p.to_json() for name, p in profile.items()} for profile in self.profiles]


def profile_from_shapes(name: str, engine_shape: Sequence[int],
                        shapes: Sequence[Sequence[int]], index: int = 0) -> BatchProfile:
    """One input's profile from get_tensor_profile_shape's [min, opt, max]. An input without
    dynamic dims takes its own shape when the engine gives no usable profile for it (an empty
    list, or dims of -1: what TensorRT reports for a tensor without one; how a static engine
    answers is unconfirmed, so both are read as "none"); a dynamic input without one is a
    UserError."""
    dims = [tuple(int(d) for d in s) for s in shapes]
    usable = len(dims) == 3 and all(len(d) == len(engine_shape) and all(x >= 0 for x in d)
                                    for d in dims)
    if usable:
        lo, opt, hi = dims
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise UserError(f"input {name}: profile {index} is not min <= opt <= max "
                            f"({list(lo)}, {list(opt)}, {list(hi)})")
        return BatchProfile(lo, opt, hi)
    if all(int(d) >= 0 for d in engine_shape):
        shape = tuple(int(d) for d in engine_shape)
        return BatchProfile(shape, shape, shape)
    raise UserError(f"input {name} has dynamic shape {list(engine_shape)} but the engine gives "
                    f"no shapes for it in optimization profile {index}")


def _dims(value: Any) -> tuple[int, ...]:
    """A trt.Dims (or any sequence) as ints; () for a Dims TensorRT marks invalid (nbDims -1,
    whose len() Python refuses)."""
    try:
        return tuple(int(d) for d in value)
    except (TypeError, ValueError):
        return ()


def read_engine_io(engine: Any, trt: Any) -> EngineIO:
    """An ICudaEngine's I/O tensors and profiles, through the TensorRT 10 API (each call
    listed in docs/tensorrt-api.md): num_io_tensors, get_tensor_name, get_tensor_mode,
    get_tensor_shape, get_tensor_dtype, num_optimization_profiles, and
    get_tensor_profile_shape(name, profile) → [min, opt, max] for each input."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        tensors.append(IOTensor(name, mode, _dims(engine.get_tensor_shape(name)),
                                str(engine.get_tensor_dtype(name).name)))
    profiles = []
    for index in range(int(engine.num_optimization_profiles)):
        profiles.append({t.name: profile_from_shapes(
            t.name, t.shape, [_dims(d) for d in engine.get_tensor_profile_shape(t.name, index)],
            index) for t in tensors if t.mode == "input"})
    return EngineIO(tuple(tensors), tuple(profiles))


# -- the NMS plugin ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NmsPlugin:
    """The engine's NMS plugin: op_type (EfficientNMS_TRT, ...), the layer / node it is,
    its attributes as far as they are known (empty when only its name was seen), and what
    gave them (engine inspector | source onnx | layer name)."""

    op_type: str
    layer: str
    attributes: dict[str, Any] = field(default_factory=dict)
    found_by: str = "source onnx"

    @property
    def replayed(self) -> bool:
        """Whether the harness has a reference kernel for it (harness.nms.plugin_nodes)."""
        return self.op_type in replayed_ops()

    @property
    def missing(self) -> list[str]:
        """Required attributes not known."""
        return [a for a in required_fields(self.op_type) if a not in self.attributes]

    def to_json(self) -> dict[str, Any]:
        return {"op_type": self.op_type, "layer": self.layer, "found_by": self.found_by,
                "attributes": dict(self.attributes)}


def nms_plugin_from_onnx(nodes: Sequence[Any]) -> Optional[NmsPlugin]:
    """The NMS node an engine built from these ONNX nodes ends in, as compare's pipeline
    picks it (harness.align.pipelines.pipeline_for): the first TRT-domain node, unless an
    ONNX NonMaxSuppression comes first (then None: TensorRT runs it as its own layer, not a
    plugin); or another tool's NMS plugin node (OTHER_NMS_PLUGINS, any domain), which the
    pipeline does not pick. nodes: onnx NodeProtos in graph order."""
    from harness.nms.plugin_nodes import node_attributes

    for node in nodes:
        if node.op_type == "NonMaxSuppression":
            return None
        if node.domain == "TRT" or (node.domain not in ("", "ai.onnx")
                                    and node.op_type in OTHER_NMS_PLUGINS):
            return NmsPlugin(node.op_type, node.name, node_attributes(node), "source onnx")
    return None


# -- the engine inspector ------------------------------------------------------------------------

@dataclass(frozen=True)
class InspectorInfo:
    """get_engine_information(LayerInformationFormat.JSON), parsed. detailed: the layers are
    records (engine built with ProfilingVerbosity.DETAILED) rather than names only. records:
    one per layer (name only → {"Name": name}). note: why nothing usable came (NONE
    verbosity, not JSON, empty)."""

    detailed: bool = False
    records: tuple[dict[str, Any], ...] = ()
    bindings: tuple[str, ...] = ()
    note: Optional[str] = None

    @property
    def layer_names(self) -> list[str]:
        return [str(r.get("Name", "")) for r in self.records]


def parse_inspector_json(text: Optional[str]) -> InspectorInfo:
    """The inspector's JSON document: {"Layers": [...], "Bindings": [...]}, each layer a
    name (LAYER_NAMES_ONLY, the default verbosity) or a record with Name, LayerType, Inputs /
    Outputs ({Name, Location, Dimensions, Format/Datatype}), ParameterType, ... (DETAILED).
    The shape follows trex's parser (tools/experimental/trt-engine-explorer/trex/parser.py:
    a string layer means "enable detailed ProfilingVerbosity") and the layer records of
    trex's example graphs and NVIDIA/TensorRT#4020; anything else gives an empty result with
    a note, never an error (the inspector only adds what a sidecar would have said)."""
    if not text or not text.strip():
        return InspectorInfo(note="the engine inspector gave nothing (built with "
                                  "ProfilingVerbosity.NONE?)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return InspectorInfo(note=f"the engine inspector's output is not JSON ({exc.msg})")
    layers = doc.get("Layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        return InspectorInfo(note="the engine inspector's JSON has no Layers list")
    bindings = tuple(str(b) for b in doc.get("Bindings", []) if isinstance(b, str))
    records = tuple(layer if isinstance(layer, dict) else {"Name": str(layer)}
                    for layer in layers)
    detailed = any(isinstance(layer, dict) for layer in layers)
    return InspectorInfo(detailed=detailed, records=records, bindings=bindings,
                         note=None if layers else "the engine inspector lists no layers")


def _known_op(texts: Sequence[str]) -> Optional[str]:
    for op in (*NMS_PLUGIN_FIELDS, *OTHER_NMS_PLUGINS):
        if any(op in t for t in texts):
            return op
    return None


def _number(value: Any) -> Any:
    """A field value as the ONNX attribute would be: numbers from numeric strings."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value else number
    return value


def _plugin_fields(record: dict[str, Any], op_type: str) -> dict[str, Any]:
    """The plugin's attributes found in a layer record: keys named as the attributes, at
    the record's top level or in one object nested in it. Where TensorRT puts a plugin's
    fields in DETAILED JSON, if it puts them anywhere, is unconfirmed (docs/tensorrt-api.md)."""
    names = NMS_PLUGIN_FIELDS.get(op_type, ())
    found = {k: _number(v) for k, v in record.items() if k in names}
    for value in record.values():
        if isinstance(value, dict):
            found.update({k: _number(v) for k, v in value.items()
                          if k in names and k not in found})
    return found


def _is_plugin(record: dict[str, Any]) -> bool:
    kind = f"{record.get('LayerType', '')} {record.get('ParameterType', '')}"
    return "plugin" in kind.lower()


def unknown_plugin_layers(info: InspectorInfo) -> list[str]:
    """Names of a detailed inspector's plugin layers whose op type is none of the NMS
    plugins the harness knows (another plugin, or an NMS whose name does not say)."""
    return [str(r.get("Name", "")) for r in info.records if info.detailed and _is_plugin(r)
            and _known_op([str(r.get("Name", "")), str(r.get("Metadata", ""))] + [
                str(v) for k, v in r.items() if "plugin" in k.lower() and isinstance(v, str)])
            is None]


def nms_plugin_from_inspector(info: InspectorInfo) -> Optional[NmsPlugin]:
    """The NMS plugin layer the inspector shows, if any. Detailed: a layer whose LayerType
    or ParameterType names a plugin, its op type read from its name, metadata or plugin
    entries, its attributes as _plugin_fields finds them (found_by "engine inspector").
    Names only: a layer whose name contains a known NMS plugin's op type (ONNX node names
    often do), without attributes (found_by "layer name")."""
    for record in info.records:
        name = str(record.get("Name", ""))
        texts = [name, str(record.get("Metadata", ""))] + [
            str(v) for k, v in record.items() if "plugin" in k.lower() and isinstance(v, str)]
        op = _known_op(texts)
        if info.detailed and _is_plugin(record):
            if op is None:
                continue  # another plugin (not an NMS the harness knows)
            return NmsPlugin(op, name, _plugin_fields(record, op), "engine inspector")
        if op is not None and not info.detailed:
            return NmsPlugin(op, name, {}, "layer name")
    return None


def precision_from_inspector(info: InspectorInfo) -> Optional[str]:
    """fp32 | fp16 | int8 from the tensor formats of a detailed inspector's layers: int8
    when any tensor is Int8, else fp16 when any is FP16 / Half, else fp32 when any is FP32;
    None without formats (names only, or shapes left dynamic), or with a type the harness
    does not name (BF16, FP8). Format strings as Polygraphy reads them ("Row major linear
    FP32", "Channel major FP16 format ...": polygraphy/backend/trt/util.py,
    dtype_from_fmt_dtype)."""
    formats = [str(t.get("Format/Datatype", "")).upper()
               for r in info.records for key in ("Inputs", "Outputs")
               for t in (r.get(key) or []) if isinstance(t, dict)]
    formats = [f for f in formats if f and "N/A" not in f]
    if not formats or any("BF16" in f or "BFLOAT16" in f or "FP8" in f for f in formats):
        return None
    if any("INT8" in f for f in formats):
        return "int8"
    if any("FP16" in f or "HALF" in f for f in formats):
        return "fp16"
    if any("FP32" in f or "FLOAT" in f for f in formats):
        return "fp32"
    return None


# -- deciding where each setting comes from ------------------------------------------------------

@dataclass(frozen=True)
class ForeignSettings:
    """What a sidecar would have said, for an engine without one, each with its source.
    settings_source: where the NMS settings come from (SETTINGS_SOURCES); nms: the plugin
    (None: no NMS plugin in the engine, or none known); precision with precision_source
    (user | engine inspector | unknown); notes: what the user should know, one line each."""

    settings_source: str
    nms: Optional[NmsPlugin]
    precision: str
    precision_source: str
    notes: tuple[str, ...] = ()


def _same(a: Any, b: Any) -> bool:
    """Equal as the plugin reads them: floats at float32 (an ONNX float attribute is stored
    as float32, so 0.45 comes back as 0.44999998...)."""
    import numpy as np

    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return bool(np.float32(a) == np.float32(b))
    return a == b


def _differences(engine: NmsPlugin, onnx: NmsPlugin) -> list[str]:
    if engine.op_type != onnx.op_type:
        return [f"plugin {engine.op_type} (engine) vs {onnx.op_type} (ONNX)"]
    return [f"{k} {engine.attributes[k]!r} (engine) vs {onnx.attributes[k]!r} (ONNX)"
            for k in sorted(set(engine.attributes) & set(onnx.attributes))
            if not _same(engine.attributes[k], onnx.attributes[k])]


def _onnx_disagrees(inspector: InspectorInfo, seen: Optional[NmsPlugin],
                    onnx_nms: Optional[NmsPlugin]) -> Optional[str]:
    """A note when the source ONNX's NMS is not the engine's: a plugin the engine lacks
    (only a detailed inspector shows every layer), one it has that the ONNX lacks, another
    op type, or other attribute values."""
    if seen is None and onnx_nms is not None and inspector.detailed:
        what = f"has {onnx_nms.op_type} but the engine has no NMS plugin layer"
    elif seen is not None and onnx_nms is None:
        what = f"has no NMS plugin but the engine has {seen.op_type} (layer {seen.layer!r})"
    elif seen is not None and onnx_nms is not None and _differences(seen, onnx_nms):
        what = f"NMS differs from the engine's: {'; '.join(_differences(seen, onnx_nms))}"
    else:
        return None
    return f"the source ONNX {what}: is it the ONNX the engine was built from?"


def decide_settings(inspector: Optional[InspectorInfo], onnx_given: bool,
                    onnx_nms: Optional[NmsPlugin], user_precision: Optional[str] = None
                    ) -> ForeignSettings:
    """Where a sidecar-less engine's NMS settings and precision come from, in this order:
    the engine inspector when it shows them (a detailed inspector with an NMS plugin layer
    carrying every required attribute, or with no NMS plugin layer at all); else the source
    ONNX when the user gave it (its NMS node, or none); else "assumed" (no NMS plugin, or
    the plugin seen by its layer name, its fields unknown). Precision: the user's, else the
    detailed inspector's tensor formats, else "unknown". An ONNX whose NMS disagrees with
    the inspector's is said in a note (is it the ONNX the engine was built from?)."""
    notes: list[str] = []
    seen = nms_plugin_from_inspector(inspector) if inspector is not None else None
    if inspector is not None and inspector.note:
        notes.append(inspector.note)
    source, nms = "assumed", seen
    # the inspector decides only when it shows every field the plugin's creator requires
    if seen is not None and seen.found_by == "engine inspector" and seen.replayed and \
            required_fields(seen.op_type) and not seen.missing:
        source = "engine inspector"
    elif seen is None and inspector is not None and inspector.detailed and \
            not unknown_plugin_layers(inspector):
        source = "engine inspector"  # every layer shown, no plugin among them
    elif onnx_given:
        source, nms = "source onnx", onnx_nms
    unknown = unknown_plugin_layers(inspector) if inspector is not None else []
    if unknown and seen is None:
        notes.append(f"plugin layer(s) {', '.join(repr(n) for n in unknown)} of a type the "
                     "harness does not know: not taken as the NMS"
                     + ("" if onnx_given else "; give --onnx"))
    if onnx_given and inspector is not None and not (unknown and seen is None):
        disagreement = _onnx_disagrees(inspector, seen, onnx_nms)
        if disagreement:
            notes.append(disagreement)
    if source == "assumed":
        if seen is not None:
            why = ("its fields were not found in the inspector's layer record"
                   if seen.found_by == "engine inspector" else
                   "its fields are not in the engine (built without "
                   "ProfilingVerbosity.DETAILED)")
            notes.append(f"NMS: {seen.op_type} seen in layer {seen.layer!r}; {why}: give "
                         "--onnx")
        elif not unknown:
            notes.append("NMS: no plugin seen in the engine's layer names, none assumed (the "
                         "model's own NMS runs on its outputs); give --onnx to be sure")
    if nms is not None and not nms.replayed:
        notes.append(f"NMS: {nms.op_type} (layer {nms.layer!r}) is a plugin the harness "
                     f"does not replay (it replays {', '.join(replayed_ops())})")
    if not onnx_given:
        notes.append("no source ONNX: layer diff and NMS candidates not available; give "
                     "--onnx")
    if user_precision:
        precision, precision_source = user_precision, "user"
    else:
        read = precision_from_inspector(inspector) if inspector is not None else None
        precision, precision_source = (read, "engine inspector") if read else \
            ("unknown", "unknown")
    return ForeignSettings(source, nms, precision, precision_source, tuple(notes))


def check_onnx_io(io: EngineIO, onnx_inputs: Sequence[str], onnx_outputs: Sequence[str],
                  onnx_name: str, engine_name: str) -> None:
    """UserError when the ONNX the user named as an engine's source has other inputs or
    outputs: TensorRT's ONNX parser names the network's tensors after the ONNX's
    (onnx-tensorrt ModelImporter.cpp registerTensor; docs/tensorrt-api.md), so an engine
    built from it has exactly its I/O names."""
    engine_in, engine_out = [t.name for t in io.inputs], [t.name for t in io.outputs]
    if set(engine_in) == set(onnx_inputs) and set(engine_out) == set(onnx_outputs):
        return
    raise UserError(f"{onnx_name} is not the source of {engine_name}: its I/O "
                    f"({', '.join(onnx_inputs)} → {', '.join(onnx_outputs)}) is not the "
                    f"engine's ({', '.join(engine_in)} → {', '.join(engine_out)})")
