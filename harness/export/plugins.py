"""TensorRT plugin nodes in an ONNX graph: find them, cut the graph at their inputs, and put
them back. onnxruntime cannot run these nodes, so the onnxruntime backend runs the cut graph and
finishes with a reference kernel, and fp16 / int8 conversion works on the cut graph only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from harness.nms.plugin_nodes import PLUGIN_KERNELS

# (domain, op_type) of the plugin nodes the harness's exporter writes and its backends
# emulate: those the reference kernels compute (one table, harness.nms.plugin_nodes)
PLUGIN_OPS = frozenset(PLUGIN_KERNELS)
# domains onnxruntime implements itself
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def op_name(node: Any) -> str:
    """`domain::op_type` as a user sees it in a graph viewer (`Conv` for the default domain)."""
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") \
        else node.op_type


def custom_nodes(model: Any) -> list[Any]:
    """Nodes outside the standard ONNX / onnxruntime domains, in graph order."""
    return [n for n in model.graph.node if n.domain not in STANDARD_DOMAINS]


def is_plugin(node: Any) -> bool:
    return (node.domain, node.op_type) in PLUGIN_OPS


@dataclass
class PluginCut:
    """A graph cut at the inputs of its plugin nodes.

    body: the graph without the plugin nodes; its outputs are the original outputs not made
    by a plugin, then every plugin input (float32, as the plugins receive them).
    plugins: the removed plugin nodes, in graph order.
    outputs: the original graph outputs (ValueInfoProto), to restore on reattach.
    """

    body: Any
    plugins: list[Any]
    outputs: list[Any]
    # nodes that consume plugin outputs (another exporter's Cast / Reshape / Concat after the
    # NMS): run after the plugins, on their outputs and the body's tensors (tail_model)
    tail: list[Any] = field(default_factory=list)
    opset_import: list[Any] = field(default_factory=list)

    def tail_inputs(self) -> list[str]:
        """The tensors the tail reads that it does not make itself."""
        made = {t for n in self.tail for t in n.output}
        seen: list[str] = []
        for n in self.tail:
            seen += [i for i in n.input if i and i not in made and i not in seen]
        return seen

    def tail_model(self, values: dict[str, Any], initializers: dict[str, Any],
                   extra: Sequence[str] = ()) -> Any:
        """The tail as a model whose inputs are typed after `values` (numpy arrays of its
        inputs, from the body and the plugins) and whose outputs are the graph outputs it
        makes, then the tensors `extra` it makes (a layer diff's intermediates)."""
        import onnx
        from onnx import helper, numpy_helper

        made = {t for n in self.tail for t in n.output}
        inputs, inits = [], []
        for name in self.tail_inputs():
            if name in initializers:
                inits.append(numpy_helper.from_array(initializers[name], name))
                continue
            v = values[name]
            inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        # untyped: onnxruntime infers them (a plugin's int32 where the graph declared int64)
        outputs = [helper.make_empty_tensor_value_info(o.name) for o in self.outputs
                   if o.name in made]
        named = {o.name for o in outputs}
        outputs += [helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(extra)
                    if n in made and n not in named]
        graph = helper.make_graph(self.tail, "tail", inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=self.opset_import)
        model.ir_version = onnx.IR_VERSION
        return model

    def reattach(self, body: Any) -> Any:
        """`body` (this cut's body, possibly converted) with the plugin nodes and the original
        outputs restored. The body must keep the names of its outputs."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(body)
        # converters may append nodes out of order (onnxruntime's float16 puts the input
        # Cast last), and onnx.checker refuses a graph that is not topologically sorted
        sort_topologically(model.graph)
        model.graph.node.extend(self.plugins)
        model.graph.node.extend(self.tail)
        del model.graph.output[:]
        model.graph.output.extend(self.outputs)
        domains = {op.domain for op in model.opset_import}
        for domain in sorted({n.domain for n in self.plugins} - domains):
            model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
        return model


def cut_at_plugins(model: Any) -> PluginCut:
    """Split `model` before its plugin nodes (a graph without any gives an unchanged body):
    the body (everything upstream), the plugins, and the tail (the nodes downstream of a
    plugin's outputs, as other exporters write a Cast or Reshape after the NMS)."""
    import onnx

    plugins = [n for n in model.graph.node if is_plugin(n)]
    outputs = [o for o in model.graph.output]
    body = onnx.ModelProto()
    body.CopyFrom(model)
    if not plugins:
        return PluginCut(body=body, plugins=[], outputs=outputs)
    downstream = {t for n in plugins for t in n.output}
    tail = []
    for node in model.graph.node:  # graph order: producers come first
        if not is_plugin(node) and downstream.intersection(node.input):
            tail.append(node)
            downstream.update(node.output)
    tail_names = {id(n) for n in tail}
    keep = [n for n in model.graph.node if not is_plugin(n) and id(n) not in tail_names]
    del body.graph.node[:]
    body.graph.node.extend(keep)
    body_outputs = [o for o in outputs if o.name not in downstream]
    cut = PluginCut(body=body, plugins=plugins, outputs=outputs, tail=tail,
                    opset_import=[op for op in model.opset_import])
    made_in_body = {t for n in keep for t in n.output} | {i.name for i in model.graph.input}
    wanted = [t for n in plugins for t in n.input if t] + \
        [t for t in cut.tail_inputs() if t in made_in_body]
    known = {o.name for o in body_outputs}
    types = _value_types(body)
    for name in wanted:
        if name in known:
            continue
        known.add(name)
        body_outputs.append(types.get(name) or onnx.helper.make_empty_tensor_value_info(name))
    del body.graph.output[:]
    body.graph.output.extend(body_outputs)
    # the plugins' opset imports would make onnxruntime look for domains it does not have
    plugin_domains = {n.domain for n in plugins} - {n.domain for n in keep + tail}
    kept_imports = [op for op in body.opset_import if op.domain not in plugin_domains]
    del body.opset_import[:]
    body.opset_import.extend(kept_imports)
    cut.opset_import = kept_imports
    return cut


def _value_types(model: Any) -> dict[str, Any]:
    """ValueInfoProto of every tensor shape inference can type, by name."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is only a nicety here: outputs may stay untyped
        return {}
    g = inferred.graph
    return {v.name: v for v in list(g.value_info) + list(g.output) + list(g.input)}


def sort_topologically(graph: Any) -> None:
    """Reorder `graph.node` in place so every node comes after the producers of its inputs:
    the existing order when it is valid, else the nearest valid one (Kahn's algorithm, lowest
    original index first). Names a node's subgraphs read from the outer scope count as its inputs. A
    cycle, or an input nothing produces, leaves those nodes at the end in their old order, for
    onnx.checker to name."""
    import heapq

    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting_on: list[set[int]] = []
    consumers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {producer[name] for name in _node_inputs(node)
                if name not in available and name in producer and producer[name] != i}
        waiting_on.append(deps)
        for d in deps:
            consumers.setdefault(d, []).append(i)
    ready = [i for i, deps in enumerate(waiting_on) if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in consumers.get(i, ()):
            waiting_on[c].discard(i)
            if not waiting_on[c]:
                heapq.heappush(ready, c)
    if order == list(range(len(nodes))):
        return
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _node_inputs(node: Any) -> set[str]:
    """A node's inputs, plus the outer-scope names its subgraphs (If / Loop / Scan bodies)
    read."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in list(attr.g.node if attr.HasField("g") else []) + \
                [n for g in attr.graphs for n in g.node]:
            names |= _node_inputs(sub)
    return names
