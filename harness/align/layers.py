"""Layer-by-layer diff: which PyTorch module produced which ONNX tensor (and so which TensorRT
tensor: the ONNX parser keeps ONNX tensor names and names layers after ONNX nodes), the
per-layer error of a target backend against PyTorch, and the first layer where it diverges.

The exporter names every node after the module scope that emitted it
(`/backbone/stage1/stage1.0/conv/Conv`), so a module's output is the output of the last node
(in graph order) inside its scope. Each mapping is checked at run time by shape; a layer whose
shapes disagree is left out and listed, never compared against the wrong tensor.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from harness.align.tensor_diff import DiffAccumulator
from harness.errors import UserError
from harness.models.source import ModelSource
from harness.results import LayerPoint, LayerRow, LayerSummary, NonfiniteLayer

# rel-L2 a layer may reach before it counts as divergent, by the target's precision
TOLERANCES = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2, "int8": 0.25}
# "the numbers start to differ": the fp32 tolerance, whatever the target's precision
DIVERGENCE = TOLERANCES["fp32"]
# nodes that never carry a module's output: quantisation wrappers, shape arithmetic
_NOT_OUTPUTS = {"QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "ConstantOfShape",
                "Identity"}


def module_path_of(node_name: str) -> str:
    """`/backbone/stage1/stage1.0/conv/Conv` → `backbone.stage1.0.conv`: the TorchScript
    exporter repeats a container's name in its children's scope (`stage1/stage1.0`), and the
    last piece is the node itself."""
    parts: list[str] = []
    for piece in node_name.strip("/").split("/")[:-1]:
        if parts and piece.startswith(parts[-1] + "."):
            parts[-1] = piece
        else:
            parts.append(piece)
    return ".".join(parts)


@dataclass(frozen=True)
class Layer:
    """module: PyTorch module path; tensor: the ONNX tensor its scope produced last; node: the
    node that produced it (the TensorRT layer of that name marks it); depth: graph order."""

    module: str
    tensor: str
    node: str
    depth: int


class ScopeNames:
    """Turns the module path a node's scope names into a module path of the PyTorch model,
    when another exporter's wrapper changed it: the path itself; the path without a wrapper's
    leading scopes (easydeploy's `/baseModel/...`); or the one module sharing the longest tail
    of at least two components with it (easydeploy's head, traced without its `bbox_head`
    scope). None when no module is that path."""

    def __init__(self, modules: Iterable[str]):
        self.modules = set(modules)
        self.by_last: dict[str, list[str]] = {}
        for m in self.modules:
            self.by_last.setdefault(m.rpartition(".")[2], []).append(m)
        self.how: dict[str, str] = {}  # path → "name" | "wrapper prefix" | "scope tail"
        self._cache: dict[str, Optional[str]] = {}

    def __call__(self, path: str) -> Optional[str]:
        if path not in self._cache:
            self._cache[path] = self._translate(path)
        return self._cache[path]

    def _translate(self, path: str) -> Optional[str]:
        if path in self.modules:
            self.how[path] = "name"
            return path
        parts = path.split(".")
        for i in range(1, len(parts)):
            tail = ".".join(parts[i:])
            if tail in self.modules and len(parts) - i >= 2:
                self.how[path] = "wrapper prefix"
                return tail
        best, best_len, tied = None, 1, False
        for m in self.by_last.get(parts[-1], []):
            mparts = m.split(".")
            n = 0
            while n < min(len(mparts), len(parts)) and mparts[-1 - n] == parts[-1 - n]:
                n += 1
            if n > best_len:
                best, best_len, tied = m, n, False
            elif n == best_len:
                tied = True
        if best is None or tied:
            return None
        self.how[path] = "scope tail"
        return best


def map_modules(nodes: Sequence[Any], modules: Sequence[str],
                all_modules: Optional[Iterable[str]] = None
                ) -> tuple[list[Layer], list[str], dict[str, int]]:
    """Layers (in graph order) for the module paths found among `nodes` (onnx NodeProtos in
    graph order), the module paths no node belongs to, and how the found ones were named
    (by name, under a wrapper's prefix, by a scope's tail). all_modules: every module path
    of the model (default `modules`), which a scope is read against."""
    last: dict[str, tuple[int, Any]] = {}
    wanted = set(modules)
    scopes = ScopeNames(all_modules if all_modules is not None else modules)
    method: dict[str, str] = {}
    for index, node in enumerate(nodes):
        if node.op_type in _NOT_OUTPUTS or not node.output or not node.name:
            continue
        scope = module_path_of(node.name)
        path = scopes(scope) if scope else None
        while scope and path is None:  # a part the model does not name as a module
            scope = scope.rpartition(".")[0]
            path = scopes(scope) if scope else None
        # the node belongs to its own module and to every enclosing one
        while path:
            if path in wanted:
                last[path] = (index, node)
                method[path] = scopes.how[scope]
            path = path.rpartition(".")[0]
    layers = [Layer(module=m, tensor=n.output[0], node=n.name, depth=0)
              for m, (i, n) in sorted(last.items(), key=lambda kv: kv[1][0])]
    layers = [Layer(lay.module, lay.tensor, lay.node, depth) for depth, lay in enumerate(layers)]
    counts = {how: sum(1 for m in method.values() if m == how)
              for how in ("name", "wrapper prefix", "scope tail")}
    return layers, [m for m in modules if m not in last], counts


def select_modules(all_modules: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The module paths matching any glob pattern (`backbone.*`, `neck.top_down_layers.0`)."""
    chosen = [m for m in all_modules if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    if not chosen:
        raise UserError(f"no module matches {', '.join(patterns)}; module paths look like "
                        f"{', '.join(all_modules[:3])}")
    return chosen


def layer_rows(layers: Sequence[Layer], stats: dict[str, DiffAccumulator],
               shapes: dict[str, list[int]]) -> list[LayerRow]:
    """One row per compared layer (graph order): module, tensor, depth, shape, the metrics."""
    return [LayerRow(module=layer.module, tensor=layer.tensor, node=layer.node,
                     depth=layer.depth, shape=shapes.get(layer.module),
                     **stats[layer.module].summary())
            for layer in layers if layer.module in stats]


def summarize_layers(rows: Sequence[LayerRow], precision: str,
                     worst: int = 5) -> LayerSummary:
    """The layer section of a target's results: tolerance of its precision, the first layer
    where numbers start to differ (past the fp32 tolerance), the first past the precision's
    own tolerance, the first with inf / NaN values (a divergence point of its own: the
    metrics of such a layer cover only its finite elements), and the worst layers by rel-L2."""
    tol = TOLERANCES.get(precision, TOLERANCES["fp32"])

    def first(limit: float) -> Optional[LayerPoint]:
        return next((LayerPoint(module=r.module, tensor=r.tensor, depth=r.depth,
                                rel_l2=r.rel_l2, tolerance=limit)
                     for r in rows if r.rel_l2 > limit), None)

    nonfinite = next((NonfiniteLayer(module=r.module, tensor=r.tensor, depth=r.depth,
                                     target=r.nonfinite_target,
                                     reference=r.nonfinite_reference)
                      for r in rows if r.nonfinite), None)
    ranked = sorted(rows, key=lambda r: -r.rel_l2)[:worst]
    return LayerSummary(
        rows=list(rows), metric="rel_l2", tolerance=tol, precision=precision,
        first_divergence=first(DIVERGENCE), first_past_tolerance=first(tol),
        first_nonfinite=nonfinite, layers_with_nonfinite=sum(1 for r in rows if r.nonfinite),
        worst=[{"module": r.module, "rel_l2": r.rel_l2, "depth": r.depth} for r in ranked])


@dataclass
class LayerDiff:
    """Accumulates per-layer stats of one target over batches, `chunk` layers per pass so
    only that many layers' activations are alive at once."""

    layers: list[Layer]
    chunk: int = 64
    stats: dict[str, DiffAccumulator] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def add_batch(self, reference: Any, target: Any, inputs: np.ndarray,
                  metas: Optional[Sequence[Any]] = None,
                  rows: Optional[Callable[[str, np.ndarray, np.ndarray],
                                          tuple[np.ndarray, np.ndarray]]] = None) -> None:
        """reference: a backend whose intermediates take module paths (torch); target: one
        whose intermediates take tensor names (onnxruntime, a marked TensorRT engine).
        metas: the batch's image metas, for a model whose later stages depend on them
        (a two-stage detector clips its proposals to each image). rows: (module, reference
        value, target value) → the two values on the same rows (a two-stage detector's RoI
        stage: the rows of the proposals both sides have, in the same order)."""
        live = [lay for lay in self.layers if lay.module not in self.skipped]
        extra = {} if metas is None else {"metas": metas}
        for start in range(0, len(live), self.chunk):
            part = live[start:start + self.chunk]
            ref = reference.intermediates(inputs, [lay.module for lay in part], **extra)
            tgt = target.intermediates(inputs, [lay.tensor for lay in part], **extra)
            for lay in part:
                r, t = ref.get(lay.module), tgt.get(lay.tensor)
                if rows is not None and r is not None and t is not None:
                    r, t = rows(lay.module, r, t)
                self._add(lay, r, t)
            del ref, tgt

    def _add(self, layer: Layer, ref: Optional[np.ndarray], tgt: Optional[np.ndarray]) -> None:
        if ref is None:
            self.skipped[layer.module] = "the module returns no single tensor"
        elif tgt is None:
            self.skipped[layer.module] = f"the target has no tensor {layer.tensor}"
        elif ref.shape != tgt.shape:
            self.skipped[layer.module] = (f"shapes differ: PyTorch {list(ref.shape)}, "
                                          f"{layer.tensor} {list(tgt.shape)}")
        if layer.module in self.skipped:
            self.stats.pop(layer.module, None)
            return
        self.stats.setdefault(layer.module, DiffAccumulator()).add(tgt, ref)
        self.shapes[layer.module] = [int(d) for d in ref.shape[1:]]

    def result(self, precision: str) -> LayerSummary:
        doc = summarize_layers(layer_rows(self.layers, self.stats, self.shapes), precision)
        doc.skipped = dict(self.skipped)
        return doc


def fused_into_parent(module: Any, chosen: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """A ConvModule's parts (conv, norm, activation) have no tensor of their own in an
    exported graph — the exporter folds the BatchNorm into the convolution, so the ONNX conv's
    output is conv + norm — and comparing PyTorch's bare conv with it is a false alarm.
    Returns the chosen paths with each part replaced by its ConvModule (once), and
    {part: ConvModule} for the report."""
    kinds = {name: type(m).__name__ for name, m in module.named_modules()}
    out: list[str] = []
    replaced: dict[str, str] = {}
    for path in chosen:
        parent = path.rpartition(".")[0]
        if parent and kinds.get(parent) == "ConvModule":
            replaced[path] = parent
            path = parent
        if path not in out:
            out.append(path)
    return out, replaced


@dataclass
class LayerMap:
    """The layers to compare and how they were found: `counts` of modules named by their
    scope ("name"), under a wrapper's leading scopes ("wrapper prefix"), by their scope's tail
    ("scope tail"), by graph position and signature ("position", harness.align.positions);
    `unmapped`: modules found none of these ways; `replaced`: ConvModule parts asked for,
    compared as their ConvModule; `position_note`: why position mapping was not used."""

    layers: list[Layer]
    unmapped: list[str]
    replaced: dict[str, str]
    counts: dict[str, int]
    position_note: Optional[str] = None


# the zero image the conv run order is learned on (any multiple of the largest stride)
POSITION_PROBE_HW = (64, 64)


def layers_for(model: ModelSource, graph: Any, patterns: Iterable[str] = ()) -> LayerMap:
    """The layers to compare for a model source and an ONNX graph (a GraphProto): its default
    layers, or the modules matching `patterns` (ConvModule parts replaced by their
    ConvModule); those no scope names are mapped by graph position where that checks out."""
    patterns = list(patterns)
    replaced: dict[str, str] = {}
    names = [n for n, _ in model.module.named_modules() if n]
    if patterns:
        modules, replaced = fused_into_parent(model.module, select_modules(names, patterns))
    else:
        modules = model.default_layers()
    nodes = list(graph.node)
    layers, unmapped, counts = map_modules(nodes, modules, names)
    counts["position"] = 0
    note = None
    if unmapped:
        layers, unmapped, counts["position"], note = _add_by_position(
            model, graph, layers, unmapped)
    return LayerMap(layers, unmapped, replaced, counts, note)


def _add_by_position(model: ModelSource, graph: Any, layers: list[Layer],
                     unmapped: list[str]) -> tuple[list[Layer], list[str], int, Optional[str]]:
    from harness.align.positions import map_by_position

    try:
        found, refused = map_by_position(model.module, graph, unmapped,
                                         {lay.module: lay.node for lay in layers},
                                         POSITION_PROBE_HW)
    except Exception as exc:  # a model whose forward needs more than an image (two-stage)
        from harness.errors import first_line

        return layers, unmapped, 0, f"position mapping not tried: {first_line(exc)}"
    if refused:
        return layers, unmapped, 0, refused
    order = {n.name: i for i, n in enumerate(graph.node) if n.name}
    producer_index = {o: i for i, n in enumerate(graph.node) for o in n.output}
    placed = [(order.get(lay.node, producer_index.get(lay.tensor, 0)), lay) for lay in layers]
    placed += [(producer_index.get(tensor, 0), Layer(m, tensor, node, 0))
               for m, (tensor, node, _) in found.items()]
    placed.sort(key=lambda p: p[0])
    merged = [Layer(lay.module, lay.tensor, lay.node, depth)
              for depth, (_, lay) in enumerate(placed)]
    return merged, [m for m in unmapped if m not in found], len(found), None
