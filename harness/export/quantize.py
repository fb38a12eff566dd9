"""fp16 and int8 versions of an exported fp32 graph. fp16: weights and compute in half, the
file's inputs and outputs stay float32. int8: QDQ (symmetric, per-channel weights, as TensorRT
wants) calibrated on dataset images. TensorRT plugin nodes are cut off first and stay fp32.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from harness.errors import UserError
from harness.export.calibration import (
    CalibrationReader, CalibrationSettings, calibration_images, calibration_key,
)
from harness.export.plugins import cut_at_plugins

PRECISIONS = ("fp32", "fp16", "int8")
# Only the network is quantized: decoding turns logits into pixel coordinates, where int8
# steps of (range / 255) would move boxes by pixels, and deployments keep it in float.
NETWORK_SCOPES = ("/backbone/", "/neck/", "/bbox_head/")
# QDQ on the inputs (activations and weights) of these ops only, not on their outputs:
# TensorRT's recommended placement, which leaves Conv + activation fusions intact.
QUANTIZED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def kept_nodes(graph: Any, keep_fp32: Sequence[str]) -> list[str]:
    """Names of the nodes of `graph` that `keep_fp32` names: exact node names, or scope
    prefixes ending in "/" (`/backbone/stage1/` keeps every node of that module)."""
    if not keep_fp32:
        return []
    names = [n.name for n in graph.node]
    missing = [k for k in keep_fp32 if not any(
        n == k or (k.endswith("/") and n.startswith(k)) for n in names)]
    if missing:  # a typo would otherwise quietly keep nothing in float
        raise UserError(f"no ONNX node is named {missing[0]!r}"
                        + (" or starts with it" if missing[0].endswith("/") else "")
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    exact = {k for k in keep_fp32 if not k.endswith("/")}
    prefixes = tuple(k for k in keep_fp32 if k.endswith("/"))
    return [n for n in names if n in exact or (prefixes and n.startswith(prefixes))]


def to_fp16(model: Any, keep_fp32: Sequence[str] = ()) -> Any:
    """fp16 copy of an fp32 ModelProto: float initializers and compute in half, Cast nodes at
    the graph boundary so inputs and outputs stay float32; ops without fp16 meaning
    (NonMaxSuppression, TopK, Range, ...: onnxruntime's default block list) stay float32.
    keep_fp32: node names / scope prefixes (kept_nodes) also left in float32, with Casts
    around them (mixed precision, harness sensitivity)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    cut = cut_at_plugins(model)
    blocked = kept_nodes(cut.body.graph, keep_fp32)
    with _quiet():
        half = convert_float_to_float16(cut.body, keep_io_types=True,
                                        op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                        node_block_list=blocked or None)
    # the converter appends its input Cast (and Resize scale Casts) after their consumers;
    # reattach sorts the nodes back into topological order, which onnx.checker requires
    return cut.reattach(half)


def to_int8(model: Any, spec: Any, input_name: str, size_hw: tuple[int, int],
            calibration: CalibrationSettings, keep_fp32: Sequence[str] = ()
            ) -> tuple[Any, dict[str, Any]]:
    """QDQ int8 copy of an fp32 ModelProto, calibrated on `calibration`'s images preprocessed
    with `spec` (the model's PreprocessSpec), one image per step. keep_fp32: node names /
    scope prefixes (kept_nodes) left without Q/DQ, i.e. in float (mixed precision, harness
    sensitivity); the calibration and its cache do not depend on them.

    Returns the model and a record of the calibration (method, images, cache key, whether the
    ranges came from the cache).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )

    paths = calibration_images(calibration.images, calibration.count)
    cut = cut_at_plugins(model)
    body_bytes = cut.body.SerializeToString()
    key = calibration_key(body_bytes, paths, calibration.method, spec.describe(), size_hw)
    cache_file = None
    if calibration.cache_dir is not None:
        try:
            calibration.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create calibration cache folder {calibration.cache_dir}: "
                            f"{exc.strerror or exc}") from None
        cache_file = calibration.cache_dir / f"int8-{key[:32]}.json"
    hit = cache_file is not None and cache_file.is_file()
    reader = CalibrationReader(paths, spec, input_name, size_hw)
    excluded = [n.name for n in cut.body.graph.node if not n.name.startswith(NETWORK_SCOPES)]
    kept = kept_nodes(cut.body.graph, keep_fp32)
    excluded = list(dict.fromkeys([*excluded, *kept]))
    with tempfile.TemporaryDirectory(prefix="harness-int8-") as tmp, _quiet():
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_static(
                cut.body, str(out), None if hit else reader,
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=excluded,
                calibrate_method=getattr(CalibrationMethod, _ORT_METHODS[calibration.method]),
                extra_options={
                    # TensorRT takes only symmetric (zero-point 0) int8
                    "ActivationSymmetric": True, "WeightSymmetric": True,
                    "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS},
                calibration_cache_path=None if cache_file is None else str(cache_file))
        except ValueError as exc:
            if "bins" not in str(exc):
                raise
            # onnxruntime's histogram calibrators fail on a tensor whose values are all
            # (nearly) equal, e.g. activations of an untrained model
            raise UserError(f"{calibration.method} calibration failed ({exc}); some tensor "
                            "has an almost constant value (an untrained model?): use "
                            "--calib-method minmax") from None
        quantized = onnx.load(str(out))
    if kept:
        _read_float_inputs(quantized.graph, set(kept))
    record = {"method": calibration.method, "images": [p.name for p in paths],
              "count": len(paths), "key": key, "cache": "hit" if hit else "miss",
              "images_read": reader.consumed,
              "cache_file": None if cache_file is None else str(cache_file),
              "placement": f"inputs of {', '.join(QUANTIZED_OPS)} in {', '.join(NETWORK_SCOPES)}",
              "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel"}
    if keep_fp32:
        record["kept_fp32"] = {"requested": list(keep_fp32), "nodes": len(kept)}
    return cut.reattach(quantized), record


def _read_float_inputs(graph: Any, kept: set[str]) -> None:
    """Let the `kept` nodes read the float tensors behind their Q/DQ inputs. onnxruntime puts
    one Q/DQ pair on a tensor for all its consumers, so a node left out of quantization
    still reads rounded activations where it shares its input with a quantized node (a
    head branch reading the neck output a downsample conv also reads); Q/DQ pairs no node
    reads any more are removed."""
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name not in kept:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == \
                "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    outputs = {o.name for o in graph.output}
    freed: set[str] = set()
    while True:
        read = {t for n in graph.node for t in n.input} | outputs
        idle = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not idle:
            break
        for n in idle:
            freed.update(n.input)
            graph.node.remove(n)
    unread = [i for i in graph.initializer if i.name in freed and i.name not in read]
    for init in unread:  # the removed pairs' scales and zero points
        graph.initializer.remove(init)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantization and float16 tools log advice at WARNING on the root logger
    and print calibration progress to stdout; the CLI prints its own summary instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
