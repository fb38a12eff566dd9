"""Layer groups: the parts of the network a user can keep in higher precision, as PyTorch
module paths (`backbone.stage1`, `neck.top_down_layers.1`, `bbox_head.head_module.convs_pred.0`)
with the ONNX nodes each holds (the exporter names every node after its module scope).

Levels: `stage` splits each top-level part (backbone, neck, head) into its children; `module`
splits every stage once more; `auto` takes the first level giving a workable number of
groups. Containers (ModuleList / ModuleDict, never called themselves) are looked through, a
module with a single child holding ops is followed down, and only modules that hold
quantized ops (Conv, Gemm, ...) become groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from harness.errors import UserError

LEVELS = ("stage", "module", "auto")
# auto: the first level with at least this many groups, unless it has more than AUTO_MAX
AUTO_MIN, AUTO_MAX = 6, 20
MAX_DEPTH = 4  # auto never splits deeper than stage + 3
# containers: their children are called, they are not (no ONNX scope of their own)
CONTAINERS = ("ModuleList", "ModuleDict")


@dataclass(frozen=True)
class LayerGroup:
    """name: module path; kind: its class (`CSPLayer`); nodes: every ONNX node of its scope,
    in graph order; quantized: those of QUANTIZED_OPS (what int8 / fp16 changes and FLOPs
    count); prefix: the ONNX node-name scope of the group (`/backbone/stage1/`), the
    TensorRT layer-name prefix too (the ONNX parser names layers after nodes)."""

    name: str
    kind: str
    nodes: tuple[str, ...]
    quantized: tuple[str, ...]
    prefix: str


def node_module(node_name: str, modules: Mapping[str, str]) -> str:
    """The module path a node belongs to: its scope (layers.module_path_of), cut back to the
    nearest path the model has ('' for none)."""
    from harness.align.layers import module_path_of

    path = module_path_of(node_name)
    while path and path not in modules:
        path = path.rpartition(".")[0]
    return path


class ModuleTree:
    """The model's modules (path → class name) with the quantized ops each holds."""

    def __init__(self, modules: Mapping[str, str], nodes: Sequence[tuple[str, str]],
                 quantized_ops: Sequence[str]):
        self.modules = dict(modules)
        self.children: dict[str, list[str]] = {}
        for path in self.modules:
            if path:
                self.children.setdefault(path.rpartition(".")[0], []).append(path)
        self.node_order = [name for name, _ in nodes]
        self.owner = {name: node_module(name, self.modules) for name, _ in nodes}
        self.quantized = {name for name, op in nodes if op in quantized_ops}
        self.ops: dict[str, int] = {}  # module → quantized ops inside it (any depth)
        for name in self.quantized:
            path = self.owner[name]
            while True:
                self.ops[path] = self.ops.get(path, 0) + 1
                if not path:
                    break
                path = path.rpartition(".")[0]

    def holding(self, path: str) -> list[str]:
        """The children of `path` holding quantized ops, containers looked through."""
        out = []
        for child in self.children.get(path, []):
            if not self.ops.get(child):
                continue
            if self.modules.get(child) in CONTAINERS:
                out.extend(self.holding(child))
            else:
                out.append(child)
        return out

    def split(self, path: str) -> list[str]:
        """`path` split into the modules below it that hold its ops: following a single
        child down until a module has two or more; [path] when it has none, or when its
        children leave some of its ops out (a functional op in its own forward)."""
        current = path
        while True:
            kids = self.holding(current)
            if not kids or sum(self.ops[k] for k in kids) != self.ops[current]:
                return [path]
            if len(kids) >= 2:
                return kids
            current = kids[0]

    def group(self, path: str) -> LayerGroup:
        nodes = tuple(n for n in self.node_order
                      if self.owner[n] == path or self.owner[n].startswith(path + "."))
        return LayerGroup(name=path, kind=self.modules.get(path, ""), nodes=nodes,
                          quantized=tuple(n for n in nodes if n in self.quantized),
                          prefix=common_scope(nodes))


def common_scope(node_names: Sequence[str]) -> str:
    """The longest scope (`/a/b/`) every name lies in; '' when they share none."""
    scopes = [n.strip("/").split("/")[:-1] for n in node_names]
    if not scopes:
        return ""
    common = scopes[0]
    for s in scopes[1:]:
        n = 0
        while n < min(len(common), len(s)) and common[n] == s[n]:
            n += 1
        common = common[:n]
    return "/" + "/".join(common) + "/" if common else ""


def level_paths(tree: ModuleTree, depth: int) -> list[str]:
    """Module paths of the groups at `depth` (1: stage), in graph order."""
    paths = tree.split("")
    if paths == [""]:
        raise UserError("no quantized operator (Conv, Gemm, MatMul) of the ONNX graph lies "
                        "in a module of the model; was it exported from this checkpoint?")
    for _ in range(depth):
        paths = [p for path in paths for p in tree.split(path)]
    first = {}
    for index, name in enumerate(tree.node_order):
        if name in tree.quantized:
            owner = tree.owner[name]
            for p in paths:
                if (owner == p or owner.startswith(p + ".")) and p not in first:
                    first[p] = index
    return sorted(paths, key=lambda p: first.get(p, 0))


def derive_groups(modules: Mapping[str, str], nodes: Sequence[tuple[str, str]],
                  quantized_ops: Sequence[str], level: str = "auto"
                  ) -> tuple[str, list[LayerGroup]]:
    """(the level used, its groups). modules: every module path of the PyTorch model → its
    class name (named_modules); nodes: (name, op_type) of the fp32 graph's nodes in graph
    order; quantized_ops: the op types the conversion changes."""
    if level not in LEVELS:
        raise UserError(f"unknown --groups '{level}'; choose {'|'.join(LEVELS)}")
    tree = ModuleTree(modules, nodes, quantized_ops)
    if level == "stage":
        return "stage", [tree.group(p) for p in level_paths(tree, 1)]
    if level == "module":
        return "module", [tree.group(p) for p in level_paths(tree, 2)]
    previous: list[str] = []
    chosen, chosen_depth = [], 1
    for depth in range(1, MAX_DEPTH + 1):
        paths = level_paths(tree, depth)
        if len(paths) > AUTO_MAX and previous:
            # past the range: the nearer of the two levels either side of it
            if AUTO_MIN - len(previous) <= len(paths) - AUTO_MAX:
                break
            chosen, chosen_depth = paths, depth
            break
        chosen, chosen_depth = paths, depth
        if len(paths) >= AUTO_MIN or paths == previous:
            break
        previous = paths
    name = {1: "stage", 2: "module"}.get(chosen_depth, f"module+{chosen_depth - 2}")
    return name, [tree.group(p) for p in chosen]


def model_modules(module: Any) -> dict[str, str]:
    """path → class name of every module of a torch nn.Module (named_modules)."""
    return {name: type(m).__name__ for name, m in module.named_modules()}
