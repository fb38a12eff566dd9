"""Multiply-accumulate work of the convolutions and matrix products of an ONNX graph, per
image, from the graph's own shapes (onnx shape inference with the batch axis set to 1):
what keeping a layer group in fp32 costs, counted as FLOPs = 2 x MACs.
"""
from __future__ import annotations

from typing import Any, Optional

from harness.errors import UserError


def _shape(value_info: Any) -> Optional[list[int]]:
    dims = value_info.type.tensor_type.shape.dim
    if not value_info.type.tensor_type.HasField("shape"):
        return None
    out = []
    for d in dims:
        if not d.HasField("dim_value"):
            return None
        out.append(int(d.dim_value))
    return out


def _prod(values: Any) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


def _with_batch_one(model: Any) -> tuple[Any, int]:
    """(a copy whose graph inputs have batch 1 where the batch axis is symbolic, and no
    stale intermediate shapes (shape inference fills them again); the batch the copy runs:
    1, or the first input's static batch)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = {i.name for i in copy.graph.initializer}
    batch = 0
    for value in copy.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
        if not batch and dims:
            batch = int(dims[0].dim_value) or 1
    del copy.graph.value_info[:]
    for out in copy.graph.output:  # their symbolic batch would clash with the inferred 1
        if out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.ClearField("shape")
    return copy, batch or 1


def node_flops(model: Any) -> dict[str, int]:
    """node name → FLOPs per image (2 x multiply-accumulates) of every Conv, ConvTranspose,
    Gemm and MatMul of `model` (an fp32 onnx ModelProto), a static batch divided out; bias
    additions are not counted.
    A shape the graph does not determine is a UserError naming the node."""
    import onnx

    single, batch = _with_batch_one(model)
    inferred = onnx.shape_inference.infer_shapes(single)
    graph = inferred.graph
    shapes: dict[str, Optional[list[int]]] = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        shapes[v.name] = _shape(v)
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    out: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        ins = [shapes.get(t) for t in node.input[:2]]
        result = shapes.get(node.output[0])
        if any(s is None for s in ins) or result is None:
            raise UserError(f"cannot count the FLOPs of {node.op_type} node {node.name!r}: "
                            "its shapes are not static in the graph (export with a fixed "
                            "input size)")
        x, w = ins
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            # each output element: (C_in / groups) x kernel MACs; W is (C_out, C_in/g, k...)
            macs = _prod(result) * _prod(w[1:])
        elif node.op_type == "ConvTranspose":
            # each input element scatters into (C_out / groups) x kernel outputs; W is
            # (C_in, C_out/g, k...)
            macs = _prod(x) * _prod(w[1:])
        elif node.op_type == "Gemm":
            k = x[0] if attrs.get("transA", 0) else x[-1]
            macs = _prod(result) * k
        else:  # MatMul: (..., M, K) x (..., K, N)
            k = x[-1] if len(x) > 1 else x[0]
            macs = _prod(result) * k
        out[node.name] = 2 * macs // batch
    return out
