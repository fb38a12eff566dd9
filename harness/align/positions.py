"""Layer mapping by graph position, for layers whose node names carry no module scope (a graph
renamed by a simplifier or optimiser, `Conv_12`, or no names at all).

PyTorch's convolutions in the order they run (forward hooks over one zero batch) and the
graph's Conv nodes in graph order are aligned by their signature (out channels, in channels
per group, kernel, stride); a module holding exactly one convolution (a ConvModule, a bare
prediction conv) then owns the aligned Conv node, and its output is that node's output
followed through the normalisation and activation the module applies (BatchNormalization,
ReLU / LeakyReLU / SiLU as Sigmoid·Mul / HardSwish…). Every step is checked: the alignment
must agree with every layer the names did map, the walk must find the module's activation,
and shapes are compared again at run time (LayerDiff) — a layer that fails any of them stays
"not mapped".
"""
from __future__ import annotations

import difflib
from typing import Any, Optional, Sequence

# activation module type → the ONNX op sequences that carry it after a Conv (each: a list of
# op types applied in turn to the running tensor; "SiLU" is special-cased as Sigmoid + Mul)
_ACTIVATION_OPS = {"ReLU": "Relu", "ReLU6": "Clip", "LeakyReLU": "LeakyRelu",
                   "Hardswish": "HardSwish", "HardSwish": "HardSwish", "Sigmoid": "Sigmoid",
                   "Tanh": "Tanh", "ELU": "Elu", "GELU": "Gelu"}
_SILU = ("SiLU", "Swish")


def conv_signature(conv: Any) -> tuple[int, ...]:
    """(out channels, in channels per group, kh, kw, stride h, stride w) of a torch Conv2d."""
    return (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size,
            *conv.stride)


def torch_conv_calls(module: Any, units: Sequence[str], input_hw: tuple[int, int]
                     ) -> list[tuple[tuple[int, ...], Optional[str]]]:
    """Every Conv2d call of one forward pass over a zero image of input_hw, in the order they
    run (hooks on the module's own forward, so a neck's top-down / bottom-up order is kept; a
    conv shared between units — RTMDet's head shares its convs across levels — counted at
    every call): (signature, the unit of `units` running it, or None)."""
    import torch
    from torch import nn

    calls: list[tuple[tuple[int, ...], Optional[str]]] = []
    stack: list[str] = []
    handles = []

    def enter(name: str):
        def hook(mod, args):
            stack.append(name)
        return hook

    def leave(mod, args, out):
        stack.pop()

    def conv_call(mod, args):  # a pre-hook: after its own unit's `enter`, before `leave`
        calls.append((conv_signature(mod), stack[-1] if stack else None))

    wanted = set(units)
    for name, m in module.named_modules(remove_duplicate=False):
        if name in wanted:
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    for m in {id(m): m for m in module.modules() if isinstance(m, nn.Conv2d)}.values():
        handles.append(m.register_forward_pre_hook(conv_call))
    try:
        p = next(module.parameters())
        x = torch.zeros((1, 3, *input_hw), dtype=p.dtype, device=p.device)
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def onnx_convs(graph: Any) -> list[tuple[Any, Optional[tuple[int, ...]]]]:
    """(Conv node, signature) in graph order; the signature from the weight initializer (also
    behind a DequantizeLinear / Identity / Cast), None when the weight is computed."""
    inits = {i.name: tuple(i.dims) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        w = node.input[1]
        while w not in inits and w in producer and \
                producer[w].op_type in ("DequantizeLinear", "Identity", "Cast"):
            w = producer[w].input[0]
        dims = inits.get(w)
        attrs = {a.name: list(a.ints) for a in node.attribute}
        strides = attrs.get("strides") or [1, 1]
        sig = (int(dims[0]), int(dims[1]), int(dims[2]), int(dims[3]), *map(int, strides)) \
            if dims is not None and len(dims) == 4 else None
        out.append((node, sig))
    return out


def _follow(graph_consumers: dict[str, list[Any]], tensor: str, unit: Any) -> Optional[tuple]:
    """From a Conv's output through the unit's norm (unless folded) and activation: (tensor,
    node name) of the unit's output, or None when the graph does not show that activation."""
    def only(t: str, op: str) -> Optional[Any]:
        users = graph_consumers.get(t, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    node_name = None
    if getattr(unit, "with_norm", False):
        bn = only(tensor, "BatchNormalization")
        if bn is not None:  # not folded into the conv
            tensor, node_name = bn.output[0], bn.name
    act = getattr(unit, "activate", None) if getattr(unit, "with_activation", False) else None
    if act is None:
        return tensor, node_name
    kind = type(act).__name__
    if kind in _SILU:
        users = graph_consumers.get(tensor, [])
        sig = next((u for u in users if u.op_type == "Sigmoid"), None)
        mul = next((u for u in users if u.op_type == "Mul" and sig is not None
                    and set(u.input) == {tensor, sig.output[0]}), None)
        if mul is None:
            return None
        return mul.output[0], mul.name
    op = _ACTIVATION_OPS.get(kind)
    nxt = only(tensor, op) if op else None
    return (nxt.output[0], nxt.name) if nxt is not None else None


def map_by_position(module: Any, graph: Any, wanted: Sequence[str], named: dict[str, str],
                    input_hw: tuple[int, int]) -> tuple[dict[str, tuple[str, str, int]],
                                                        Optional[str]]:
    """Modules of `wanted` (conv units: a ConvModule or a Conv2d, each running one
    convolution) mapped by position: {module: (tensor, node name, index of its Conv in the
    graph)}, and why none were when the alignment is refused. named: {module: node name} the
    names mapped — each must sit on the Conv the alignment gives it, else it is not trusted."""
    from torch import nn

    modules = dict(module.named_modules(remove_duplicate=False))
    calls = torch_conv_calls(module, list(wanted) + list(named), input_hw)
    convs = onnx_convs(graph)
    pairs: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, [sig for sig, _ in calls],
                                      [sig for _, sig in convs], autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            pairs[block.a + k] = block.b + k
    runs: dict[str, list[int]] = {}
    for i, (_, owner) in enumerate(calls):
        if owner is not None:
            runs.setdefault(owner, []).append(i)

    def aligned(path: str) -> Optional[int]:  # the graph Conv of a unit that ran one conv
        mine = runs.get(path, [])
        return pairs.get(mine[0]) if len(mine) == 1 else None

    # the names are the check: a module the names mapped must own the Conv aligned with it
    conv_names = {n.name: j for j, (n, _) in enumerate(convs) if n.name}
    for path, node in named.items():
        j = aligned(path)
        owner = _conv_feeding(graph, node, set(conv_names))
        if j is not None and owner is not None and conv_names[owner] != j:
            return {}, (f"the position alignment puts {path} on Conv #{j}, its name on "
                        f"{owner}: not trusted")
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    found: dict[str, tuple[str, str, int]] = {}
    for path in wanted:
        j = aligned(path)
        if j is None:
            continue
        node, unit = convs[j][0], modules[path]
        end = (node.output[0], node.name) if isinstance(unit, nn.Conv2d) else \
            _follow(consumers, node.output[0], unit)
        if end is not None:
            found[path] = (end[0], end[1] or node.name, j)
    return found, None


def _conv_feeding(graph: Any, node_name: str, conv_names: set[str]) -> Optional[str]:
    """The Conv node at or just upstream of `node_name` (through a unit's norm / activation,
    a few nodes), or None."""
    by_name = {n.name: n for n in graph.node if n.name}
    producer = {o: n for n in graph.node for o in n.output}
    todo, seen = [by_name.get(node_name)], 0
    while todo and seen < 6:
        node = todo.pop(0)
        seen += 1
        if node is None:
            continue
        if node.name in conv_names:
            return node.name
        todo += [producer.get(i) for i in node.input if i in producer]
    return None
