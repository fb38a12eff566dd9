"""TensorRT pre-flight on the CPU: what in an ONNX file will stop a TensorRT build, or change on
the way in, found before anyone runs `trtexec`. Pure functions over an onnx ModelProto giving
`Finding`s; which operators the ONNX parser imports is data (tensorrt_onnx_ops.json, parsed from
onnx-tensorrt's docs/operators.md, with its source in the file).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from harness.errors import UserError, first_line
from harness.export.metadata import read_metadata
from harness.export.plugins import op_name

# error: a TensorRT build fails; warning: it builds, but something changes; info: worth knowing
SEVERITIES = ("error", "warning", "info")
OPS_FILE = "tensorrt_onnx_ops.json"  # package data: operator lists per TensorRT version
DEFAULT_TRT_VERSION = "10"
DEFAULT_DOMAINS = ("", "ai.onnx")
# output size depends on the data (NonZero and native NonMaxSuppression imported since
# TensorRT 8.5: onnx-tensorrt docs/Changelog.md "8.5 GA")
DATA_DEPENDENT_OPS = ("NonZero", "NonMaxSuppression", "Unique")
# BatchedNMS*_TRT takes topK <= 4096 (docs/nms-semantics.md "TensorRT BatchedNMS_TRT")
BATCHED_NMS_MAX_TOPK = 4096
# ops a constant K passes through unchanged in value (the layout does not matter for K)
_SAME_VALUES = ("Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten")
SHOWN = 5  # names listed in a finding before "and N more"


@dataclass(frozen=True)
class Finding:
    """One thing found: severity (error | warning | info), code (what kind), message (one
    line, with the consequence), and where: node name, op (`domain::op`), module path."""

    severity: str
    code: str
    message: str
    node: str = ""
    op: str = ""
    module: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class CheckResult:
    """The findings for one file, against one TensorRT version's operator list; true when no
    finding says the build will fail."""

    path: str
    trt_version: str
    operators_source: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def __bool__(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "trt_version": self.trt_version,
                "operators_source": self.operators_source, "builds": bool(self),
                "findings": [f.to_json() for f in self.findings]}


@functools.lru_cache(maxsize=1)
def operator_table() -> dict[str, Any]:
    from importlib.resources import files

    return json.loads(files("harness.export").joinpath(OPS_FILE).read_text())


def resolve_version(version: str) -> str:
    """The operator-list key for a TensorRT version: "10", "10.3.0" → "10.x"; "8", "8.6.1" →
    "8.6"; a version no list covers ("8.5", "11") is a UserError."""
    keys = list(operator_table()["versions"])
    v = str(version).strip()
    for key in keys:
        major = key.split(".")[0]
        if v in (key, major) or v.startswith(key + ".") or \
                key.endswith(".x") and v.startswith(major + "."):
            return key
    raise UserError(f"no operator list for TensorRT {version}; the checker has "
                    f"{', '.join(keys)}")


def check_file(path: Union[str, Path], trt_version: str = DEFAULT_TRT_VERSION,
               config_values: Optional[Mapping[str, int]] = None) -> CheckResult:
    """Check the ONNX file at `path` (external weights stay on disk); UserError for a missing
    or unreadable file. `config_values`: named settings a TopK's K may come from
    (`{"model.test_cfg.nms_pre": 30000}`), besides those in the file's harness metadata."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserError(f"cannot read {path} as ONNX: {first_line(exc)}") from None
    key = resolve_version(trt_version)
    return CheckResult(str(path), key, operator_table()["versions"][key]["source"],
                       check_model(model, key, config_values, path))


def check_model(model: Any, trt_version: str = DEFAULT_TRT_VERSION,
                config_values: Optional[Mapping[str, int]] = None,
                path: Union[str, Path, None] = None) -> list[Finding]:
    """Every finding for `model` (an onnx ModelProto), errors first. `path`: the file it came
    from, which onnx.checker then reads itself (external weights, files over 2 GB)."""
    table = operator_table()
    key = resolve_version(trt_version)
    ops = table["versions"][key]
    named = {**metadata_values(model), **dict(config_values or {})}
    nodes = list(all_nodes(model.graph))
    findings = checker_findings(model if path is None else str(path))
    findings += topk_findings(model, nodes, ops, named) + data_dependent_findings(nodes, ops)
    findings += operator_findings(model, nodes, ops) + plugin_findings(nodes, table, key)
    findings += int64_findings(model, ops)
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def all_nodes(graph: Any) -> Iterator[Any]:
    """The graph's nodes and those of its subgraphs (If / Loop / Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_nodes(sub)


def metadata_values(model: Any) -> dict[str, int]:
    """The integer settings a harness export recorded, by the name a user set them with."""
    meta = read_metadata(model) or {}
    test_cfg = (meta.get("model") or {}).get("test_cfg") or {}
    out = {f"model.test_cfg.{k}": v for k, v in test_cfg.items() if type(v) is int}
    nms = meta.get("nms") or {}
    out.update({flag: nms[key] for key, flag in (("pre_topk", "--pre-topk"),
                                                 ("keep_topk", "--keep-topk"))
                if type(nms.get(key)) is int})
    return out


def checker_findings(model: Union[Any, str]) -> list[Finding]:
    """onnx.checker with full_check (strict shape inference too). Plugin nodes pass: the
    checker skips ops of a custom domain it has no schema for when the model imports that
    domain; what they need is plugin_findings' business."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError: both say what is wrong
        return [Finding("error", "onnx-checker", f"onnx.checker (full check) rejects the "
                        f"graph: {first_line(exc)}; TensorRT's parser may refuse it too")]
    return []


def known_values(model: Any) -> dict[str, Any]:
    """Tensor name → numpy value where the graph makes it constant: initializers, Constant
    nodes, dimensions shape inference knows (Shape, and Gather of one dimension), and simple
    chains of them (Cast, Reshape, Squeeze, Unsqueeze, Identity, Gather, Concat, Min, Max)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    values: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                              if not i.data_location}  # external weights: not loaded
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                           for d in v.type.tensor_type.shape.dim]
                  for v in list(inferred.value_info) + list(inferred.input)}
    except Exception:  # a graph the checker rejects anyway
        shapes = {}
    for node in model.graph.node:
        ins, op = [values.get(n) for n in node.input], node.op_type
        out = node.output[0] if node.output else ""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            if op == "Constant" and "value" in attrs:
                values[out] = numpy_helper.to_array(attrs["value"])
            elif op == "Constant" and ("value_int" in attrs or "value_ints" in attrs):
                values[out] = np.array(attrs.get("value_int", attrs.get("value_ints")), np.int64)
            elif op == "Shape" and node.input[0] in shapes:
                dims = shapes[node.input[0]][attrs.get("start", 0):attrs.get("end")]
                # a list while a dimension is unknown: Gather may still pick a known one
                values[out] = dims if None in dims else np.array(dims, np.int64)
            elif op == "Gather" and isinstance(ins[0], list) and ins[1] is not None:
                if ins[0][int(ins[1])] is not None:
                    values[out] = np.array(ins[0][int(ins[1])], np.int64)
            elif any(not isinstance(v, np.ndarray) for v in ins):
                continue
            elif op == "Gather":
                values[out] = np.take(ins[0], ins[1], axis=attrs.get("axis", 0))
            elif op in _SAME_VALUES:
                values[out] = ins[0]
            elif op == "Cast":
                values[out] = ins[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
            elif op in ("Min", "Max"):
                values[out] = functools.reduce(getattr(np, op.lower() + "imum"), ins)
            elif op == "Concat":
                values[out] = np.concatenate([np.atleast_1d(v) for v in ins])
        except Exception:  # an odd node just stays unknown
            continue
    return values


def topk_findings(model: Any, nodes: list[Any], ops: Mapping[str, Any],
                  named: Mapping[str, int]) -> list[Finding]:
    """TopK nodes whose K is over TensorRT's limit (K <= 3840, docs/nms-semantics.md "TopK"),
    whose K is known only at run time, or whose `sorted` is 0 where the list says it must be 1."""
    import numpy as np

    # the exporter's scope naming, owned by the layer map (align comes after export: imported
    # on use, until it moves next to the exporter)
    from harness.align.layers import module_path_of
    from harness.artifacts.layout import k_upper_bound

    limit, values, out = int(ops["topk_max_k"]), known_values(model), []
    for node in (n for n in nodes if n.op_type == "TopK" and n.domain in DEFAULT_DOMAINS):
        where = dict(node=node.name, op="TopK", module=module_path_of(node.name))
        label = f"TopK {node.name or node.output[0]!r}"
        attrs = {a.name: a.i for a in node.attribute}
        k_input = node.input[1] if len(node.input) > 1 else None
        k = values.get(k_input) if k_input else attrs.get("k")
        if isinstance(k, int) or isinstance(k, np.ndarray) and k.size == 1:
            k = int(np.asarray(k).reshape(-1)[0])
            cause = " / ".join(f"{name} = {v}" for name, v in named.items() if v == k)
            if not cause and k > limit:  # K = min(setting, candidates), as exporters write it
                cause = " / ".join(f"{name} = {v}" for name, v in named.items() if v > k)
                cause += ", capped at the count of candidates it ranks" if cause else ""
            if k > limit:
                out.append(Finding("error", "topk-k-over-limit", f"{label}: K = {k}"
                                   + (f" (from {cause})" if cause else "") + f" > {limit}, "
                                   "TensorRT's TopK limit: the build fails", **where))
        else:
            bound = k_upper_bound(model, k_input) if k_input else None
            out.append(Finding(
                "info" if bound is not None and bound <= limit else "warning",
                "topk-k-data-dependent", f"{label}: K is computed at run time"
                + (f"; it is at most {bound}" if bound is not None else "") + "; TensorRT "
                f">= 8.6 accepts a run-time K (onnx-tensorrt Changelog 8.6 EA) but its TopK takes "
                f"K <= {limit} (what happens past it at run time: unverified)", **where))
        if attrs.get("sorted", 1) == 0 and "`sorted` must be 1" in ops["supported"]["TopK"]:
            out.append(Finding("error", "topk-unsorted", f"{label}: sorted = 0; onnx-tensorrt "
                               "imports TopK only with sorted = 1", **where))
    return out


def data_dependent_findings(nodes: list[Any], ops: Mapping[str, Any]) -> list[Finding]:
    """Importable ops whose output size depends on the data (an op the parser lacks is
    operator_findings' error)."""
    out = []
    for node in nodes:
        if node.op_type not in DATA_DEPENDENT_OPS or node.domain not in DEFAULT_DOMAINS \
                or node.op_type not in ops["supported"]:
            continue
        where = dict(node=node.name, op=node.op_type)
        if node.op_type == "NonMaxSuppression":  # importer: addNMS (onnxOpImporters.cpp)
            out.append(Finding("warning", "data-dependent-shape", f"NonMaxSuppression "
                               f"{node.name!r}: imported as TensorRT's INMSLayer, whose output "
                               "size depends on the data and whose rows come by batch then "
                               "descending score, not by batch then class as ONNX's "
                               "(docs/nms-semantics.md)", **where))
        else:
            out.append(Finding("info", "data-dependent-shape", f"{node.op_type} {node.name!r}: "
                               "output size depends on the data; imported since TensorRT 8.5 "
                               "(onnx-tensorrt Changelog 8.5 GA); its size is known only as "
                               "the engine runs (how the runtime allocates it: unverified)",
                               **where))
    return out


def operator_findings(model: Any, nodes: list[Any], ops: Mapping[str, Any]) -> list[Finding]:
    """Default-domain ops the parser does not import, one finding per op; an opset outside
    the range the list names."""
    by_op: dict[str, list[str]] = {}
    for node in nodes:
        if node.domain in DEFAULT_DOMAINS and node.op_type not in ops["supported"]:
            by_op.setdefault(node.op_type, []).append(node.name or node.output[0])
    out = [Finding("error", "unsupported-op", f"{op} ({len(names)} node(s): {_names(names)}) is "
                   + ("unsupported" if op in ops["unsupported"] else "not listed (no importer: "
                      "the parser then looks for a plugin of that name)")
                   + f" in {ops['source']}: the build fails", node=names[0], op=op)
           for op, names in sorted(by_op.items())]
    low, high = ops["opsets"]
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is not None and (opset > high or low is not None and opset < low):
        out.append(Finding("warning", "opset", f"opset {opset} is outside the range the operator "
                           f"list names ({low or 'any'} to {high}); import may fail"))
    return out


def plugin_findings(nodes: list[Any], table: Mapping[str, Any], key: str) -> list[Finding]:
    """Nodes outside the default domain, which the parser hands to a plugin of the node's name
    (FallbackPluginImporter): the library each needs, its deprecation in TensorRT `key`, and
    the TRT NMS plugins' required attributes and topK limits."""
    from harness.nms.plugin_nodes import (
        BATCHED_NMS_REQUIRED, EFFICIENT_NMS_REQUIRED, node_attributes,
    )

    out = []
    for node in (n for n in nodes if n.domain not in DEFAULT_DOMAINS):
        name = op_name(node)
        label, where, entry = f"{name} {node.name!r}", dict(node=node.name, op=name), \
            table["plugins"].get(name)
        if entry is None:
            lib = table["plugin_domains"].get(node.domain)
            out.append(Finding("warning", "plugin", f"{label}: needs a plugin from {lib}", **where)
                       if lib else Finding("error", "plugin", f"{label}: needs a loaded plugin "
                                           f"library registering {node.op_type!r}; the build "
                                           "fails without one", **where))
            continue
        library, since, gone = entry["library"].split(" (")[0], entry["deprecated_since"], \
            entry["removed_in"]
        if gone and _version_at_least(key, gone):
            out.append(Finding("error", "plugin", f"{label}: absent from TensorRT {gone} on "
                               f"(deprecated since {since}; use {entry['replacement']})",
                               **where))
        elif since and _version_at_least(key, since):
            out.append(Finding("warning", "plugin", f"{label}: needs {library}; deprecated since "
                               f"TensorRT {since}" + (f", absent in {gone}" if gone else ""),
                               **where))
        else:  # mmdeploy's library is the user's to load (trtexec --plugins=...)
            out.append(Finding("warning" if node.domain == "mmdeploy" else "info", "plugin",
                               f"{label}: needs {library}", **where))
        attrs = node_attributes(node)
        batched = node.domain == "TRT" and node.op_type.startswith("BatchedNMS")
        required = EFFICIENT_NMS_REQUIRED if name == "TRT::EfficientNMS_TRT" else \
            BATCHED_NMS_REQUIRED if batched else ()
        missing = [a for a in required if a not in attrs]
        if missing:
            out.append(Finding("error", "plugin-attributes", f"{label} lacks "
                               f"{', '.join(missing)}, which the plugin creator requires",
                               **where))
        top, keep = int(attrs.get("topK", 0)), int(attrs.get("keepTopK", 0))
        if batched and top > BATCHED_NMS_MAX_TOPK:
            out.append(Finding("error", "plugin-topk", f"{label}: topK {top} > "
                               f"{BATCHED_NMS_MAX_TOPK}, the plugin's limit "
                               "(docs/nms-semantics.md; at build or at run: unverified)", **where))
        if batched and "topK" in attrs and keep > top:
            out.append(Finding("warning", "plugin-topk", f"{label}: keepTopK {keep} > topK {top}: "
                               "the plugin then writes no detections (docs/nms-semantics.md)",
                               **where))
    return out


def _version_at_least(key: str, version: str) -> bool:
    """Whether TensorRT `key` ("10.x": some 10 release; "8.6") is at or past `version`."""
    return [float("inf") if p == "x" else int(p) for p in key.split(".")] >= \
        [int(p) for p in version.split(".")]


def int64_findings(model: Any, ops: Mapping[str, Any]) -> list[Finding]:
    """INT64 weights and graph inputs / outputs: cast to INT32 (values clamped) before
    TensorRT 9, kept since (onnx-tensorrt Changelog 9.0 EA)."""
    from onnx import TensorProto

    g = model.graph
    names = [i.name for i in g.initializer if i.data_type == TensorProto.INT64]
    names += [n.output[0] for n in g.node if n.op_type == "Constant" and any(
        a.name == "value" and a.t.data_type == TensorProto.INT64 for a in n.attribute)]
    io = [v.name for v in list(g.input) + list(g.output)
          if v.type.tensor_type.elem_type == TensorProto.INT64]
    what = "; ".join(([f"{len(names)} INT64 initializer(s) / constant(s) ({_names(names)})"]
                      if names else []) + ([f"INT64 graph input/output(s) {_names(io)}"]
                                           if io else []))
    if not what:
        return []
    if ops["int64"] == "native":
        return [Finding("info", "int64", f"{what}: TensorRT >= 9 keeps INT64 (INT64 bindings "
                        "for INT64 inputs / outputs; onnx-tensorrt Changelog 9.0 EA)")]
    return [Finding("warning", "int64", f"{what}: this TensorRT casts INT64 to INT32, clamping "
                    f"values to +-INT_MAX ({ops['source']})")]


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more"
                                       if len(names) > SHOWN else "")
