"""What an ONNX file *is*, read from its graph, never guessed: which output convention it
follows (the harness's own raw / decoded / end2end, mmyolo easydeploy's `num_dets, boxes,
scores, labels`, mmdeploy's `dets, labels`), its NMS node and every NMS setting with where it
came from (an attribute, a constant input, the file's metadata, a value computed in the graph
and read when it runs), the TopK nodes around the NMS, and the tensors that hold its NMS
candidates. An unknown layout is one line naming the outputs found and the layouts known.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from harness.errors import UserError

# output conventions of end2end files: convention → (output names, the NMS ops it uses)
END2END_CONVENTIONS = {
    "harness onnx": ("boxes", "scores", "selected_indices"),
    "harness efficient": ("num_detections", "detection_boxes", "detection_scores",
                          "detection_classes"),
    "harness batched": ("num_detections", "nmsed_boxes", "nmsed_scores", "nmsed_classes"),
    "easydeploy": ("num_dets", "boxes", "scores", "labels"),
    "mmdeploy": ("dets", "labels"),
}
NMS_OPS = {("", "NonMaxSuppression"): "onnx", ("TRT", "EfficientNMS_TRT"): "efficient",
           ("TRT", "BatchedNMSDynamic_TRT"): "batched", ("TRT", "BatchedNMS_TRT"): "batched",
           ("mmdeploy", "TRTBatchedNMS"): "mmdeploy_batched"}
# ops a candidate tensor passes through on its way into the NMS without changing what it
# holds (layout only); the Gather of a pre-NMS TopK is recognised on its own (_walk_back)
_LAYOUT_OPS = {"Reshape", "Transpose", "Flatten", "Unsqueeze", "Squeeze"}
# ops a constant passes through with its value unchanged
_SAME_VALUES = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten")


@dataclass(frozen=True)
class Setting:
    """An NMS setting's value and where it came from: attribute, constant input, metadata,
    computed (in the graph: read when the file runs), assumed (the op's documented default)."""

    value: Any
    source: str


@dataclass
class FileLayout:
    """variant: raw | decoded | end2end; convention: harness, easydeploy, mmdeploy;
    outputs: the file's output names; nms_node: the NMS node's name (end2end); nms_kind:
    onnx | efficient | batched | mmdeploy_batched; settings: name → Setting;
    candidate_boxes / candidate_scores: the tensors holding every candidate before any
    pre-NMS TopK (boxes (B, N, 4) or (B, N, 1, 4), scores (B, N, C) or (B, C, N));
    pre_topk / keep_topk: TopK nodes (name, K tensor) cutting candidates before NMS (over each
    box's best score) and detections after it."""

    variant: str
    convention: str
    outputs: list[str]
    nms_node: Optional[str] = None
    nms_kind: Optional[str] = None
    settings: dict[str, Setting] = field(default_factory=dict)
    candidate_boxes: Optional[str] = None
    candidate_scores: Optional[str] = None
    pre_topk: Optional[tuple[str, str]] = None
    keep_topk: Optional[tuple[str, str]] = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"variant": self.variant, "convention": self.convention,
                "outputs": self.outputs, "nms_node": self.nms_node, "nms_kind": self.nms_kind,
                "settings": {k: {"value": v.value, "source": v.source}
                             for k, v in self.settings.items()},
                "candidates": [self.candidate_boxes, self.candidate_scores],
                "pre_topk_node": None if self.pre_topk is None else self.pre_topk[0],
                "keep_topk_node": None if self.keep_topk is None else self.keep_topk[0],
                "notes": list(self.notes)}


def _known_layouts() -> str:
    shown = ["raw head maps (cls_scores.i, bbox_preds.i[, objectnesses.i])",
             "decoded candidates (boxes, scores[, objectness])"]
    shown += [f"{name} end2end ({', '.join(outs)})" for name, outs in END2END_CONVENTIONS.items()]
    return "; ".join(shown)


class _Graph:
    def __init__(self, proto: Any):
        from onnx import numpy_helper

        self.nodes = list(proto.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t"):
                self.constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def constant(self, name: str) -> Any:
        """The value of `name` when it is a constant (through Cast / Reshape / Unsqueeze /
        Squeeze of one), else None."""
        seen = 0
        while name not in self.constants and name in self.producer and seen < 8:
            node = self.producer[name]
            if node.op_type not in _SAME_VALUES:
                return None
            name, seen = node.input[0], seen + 1
        return self.constants.get(name)

    def cap(self, name: str) -> Optional[int]:
        """The constant upper bound of a K the graph computes as min(constant, x): a Min node,
        or Where(Less(a, b), a, b) (mmdeploy's form), within a few layout ops; None when
        there is none."""
        def source(tensor: str) -> str:
            while tensor in self.producer and self.producer[tensor].op_type in _SAME_VALUES:
                tensor = self.producer[tensor].input[0]
            return tensor

        node = self.producer.get(source(name))
        if node is None:
            return None
        if node.op_type == "Min":
            branches = list(node.input)
        elif node.op_type == "Where" and len(node.input) == 3:
            cond = self.producer.get(source(node.input[0]))
            x, y = source(node.input[1]), source(node.input[2])
            if cond is None or len(cond.input) != 2:
                return None
            a, b = (source(i) for i in cond.input)

            def same(u: str, v: str) -> bool:  # one tensor, or two equal constants
                cu, cv = self.constant(u), self.constant(v)
                return u == v or (cu is not None and cv is not None and cu.size == cv.size == 1
                                  and cu.reshape(-1)[0] == cv.reshape(-1)[0])

            if not ((cond.op_type == "Less" and same(a, x) and same(b, y)) or
                    (cond.op_type == "Greater" and same(a, y) and same(b, x))):
                return None  # not a min of its two branches
            branches = [x, y]
        else:
            return None
        found = [int(v.reshape(-1)[0]) for v in map(self.constant, branches)
                 if v is not None and v.size == 1]
        return min(found) if found else None

    def ancestors(self, name: str, limit: int = 200) -> set[int]:
        """ids of the nodes upstream of tensor `name` (breadth first, at most `limit` nodes)."""
        from collections import deque

        out: set[str] = set()
        todo = deque([name])
        while todo and len(out) < limit:
            node = self.producer.get(todo.popleft())
            if node is None or id(node) in out:
                continue
            out.add(id(node))
            todo.extend(i for i in node.input if i)
        return out


def read_layout(proto: Any, metadata: Optional[dict] = None,
                head_variant: Optional[str] = None) -> FileLayout:
    """The layout of an ONNX ModelProto. metadata: the harness's export metadata, when the
    file has it; head_variant: what the model source calls the outputs (raw / decoded) when
    they are its own (ModelSource.output_variant)."""
    outputs = [o.name for o in proto.graph.output]
    g = _Graph(proto)
    nms = [n for n in g.nodes if (n.domain if n.domain != "ai.onnx" else "", n.op_type)
           in NMS_OPS]
    if not nms:
        if head_variant in ("raw", "decoded"):
            return FileLayout(head_variant, "harness", outputs)
        raise UserError(f"outputs {', '.join(outputs)} match no layout the harness knows "
                        f"({_known_layouts()})")
    if len(nms) > 1:
        raise UserError(f"the graph has {len(nms)} NMS nodes ({', '.join(n.name for n in nms)})"
                        "; the harness compares files with one")
    node = nms[0]
    convention = next((name for name, outs in END2END_CONVENTIONS.items()
                       if set(outs) <= set(outputs)), None)
    if convention is None:
        raise UserError(f"outputs {', '.join(outputs)} (with a {node.op_type} node) match no "
                        f"layout the harness knows ({_known_layouts()})")
    if convention.startswith("harness") and metadata is None:
        convention = "harness-style"
    kind = NMS_OPS[(node.domain if node.domain != "ai.onnx" else "", node.op_type)]
    layout = FileLayout("end2end", convention, outputs, node.name or node.op_type, kind)
    layout.settings = _settings(g, node, kind, metadata)
    _find_candidates(g, node, layout)
    return layout


def _attr(node: Any) -> dict[str, Any]:
    from harness.nms.plugin_nodes import node_attributes

    return node_attributes(node)


def _settings(g: _Graph, node: Any, kind: str, metadata: Optional[dict]) -> dict[str, Setting]:
    a = _attr(node)

    def attr(name: str, default: Any = None) -> Setting:
        if name in a:
            return Setting(a[name], "attribute")
        return Setting(default, "assumed (the op's default)")

    if kind == "onnx":
        def const(i: int, default: Any) -> Setting:
            if len(node.input) <= i or not node.input[i]:
                return Setting(default, "assumed (input absent: the op's default)")
            value = g.constant(node.input[i])
            if value is None:
                return Setting(None, "computed (read when the file runs)")
            return Setting(value.reshape(-1)[0].item(), "constant input")

        return {"max_output_boxes_per_class": const(2, 0), "iou_threshold": const(3, 0.0),
                "score_threshold": const(4, None),
                "center_point_box": attr("center_point_box", 0)}
    if kind == "efficient":
        return {k: attr(k, d) for k, d in (("score_threshold", None), ("iou_threshold", None),
                                           ("max_output_boxes", None), ("box_coding", 0),
                                           ("score_activation", 0), ("class_agnostic", 0),
                                           ("background_class", -1))}
    if kind == "batched":
        return {k: attr(k, d) for k, d in (("topK", None), ("keepTopK", None),
                                           ("scoreThreshold", None), ("iouThreshold", None),
                                           ("isNormalized", 1), ("caffeSemantics", 1),
                                           ("clipBoxes", 1), ("shareLocation", 1))}
    return {k: attr(k, d) for k, d in (("topk", None), ("keep_topk", None),
                                       ("score_threshold", None), ("iou_threshold", None),
                                       ("clip_boxes", 0))}


def _walk_back(g: _Graph, name: str) -> tuple[str, Optional[Any]]:
    """From an NMS input back to the tensor that holds every candidate: through layout-only
    ops and through the Gather of a pre-NMS TopK (returned as the second value)."""
    topk = None
    for _ in range(32):
        node = g.producer.get(name)
        if node is None:
            break
        if node.op_type in _LAYOUT_OPS:
            name = node.input[0]
            continue
        if node.op_type == "Gather":
            upstream = g.ancestors(node.input[1], limit=60)
            cut = next((n for n in g.nodes if id(n) in upstream and n.op_type == "TopK"),
                       None)
            if cut is not None:
                topk, name = cut, node.input[0]
                continue
        break
    return name, topk


def _find_candidates(g: _Graph, node: Any, layout: FileLayout) -> None:
    boxes, box_topk = _walk_back(g, node.input[0])
    scores, score_topk = _walk_back(g, node.input[1])
    layout.candidate_boxes, layout.candidate_scores = boxes, scores
    topk = box_topk or score_topk
    if topk is not None:
        source = g.producer.get(topk.input[0])
        if source is None or source.op_type != "ReduceMax":
            raise UserError(f"TopK node {_label(topk)} before the NMS ranks something other "
                            "than each box's best class score; the harness cannot replay it")
        layout.pre_topk = (_label(topk), topk.input[1])
        layout.settings["pre_topk"] = _k_setting(g, topk.input[1])
    # a TopK downstream of the NMS output that cuts the detections (mmdeploy's keep_top_k)
    down = _downstream(g, node.output[0])
    keep = next((n for n in g.nodes if id(n) in down and n.op_type == "TopK"), None)
    if keep is not None and layout.convention == "mmdeploy":
        layout.keep_topk = (_label(keep), keep.input[1])
        layout.settings["keep_topk"] = _k_setting(g, keep.input[1])
    elif keep is not None:
        layout.notes.append(f"TopK {_label(keep)} after the NMS sorts the detections")


def k_upper_bound(proto: Any, k_name: str) -> Optional[int]:
    """The constant bound of a K the graph computes as min(constant, count), if it has one."""
    return _Graph(proto).cap(k_name)


def _label(node: Any) -> str:
    """A node's name, or (a graph with its names stripped) its first output."""
    return node.name or f"{node.op_type} → {node.output[0]}"


def _k_setting(g: _Graph, k_name: str) -> Setting:
    k = g.constant(k_name)
    if k is not None:
        return Setting(int(k.reshape(-1)[0]), "constant input")
    cap = g.cap(k_name)
    if cap is not None:
        return Setting(cap, "constant in the graph, min with the count (applied as run)")
    return Setting(None, "computed (read when the file runs)")


def _downstream(g: _Graph, name: str, limit: int = 200) -> set[int]:
    out: set[int] = set()
    todo = [name]
    while todo and len(out) < limit:
        for c in g.consumers.get(todo.pop(), []):
            if id(c) not in out:
                out.add(id(c))
                todo += list(c.output)
    return out
