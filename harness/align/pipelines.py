"""Each backend's post-processing as a replayable pipeline: where its NMS candidates come from
(decoded head maps, a decoded file's outputs, an NMS node's inputs) and the reference kernel
that replays its NMS in trace mode on its *own* candidates, so every detection it gave or lost
has a recorded fate (harness.nms.trace).

- `SourcePipeline` (alias `MmyoloPipeline`): the model source's own decode + NMS (for mmyolo,
  predict_by_feat): the PyTorch reference, and raw / decoded files, whose NMS the harness runs
  with the source's settings (its test_cfg).
- `OnnxNmsPipeline`: an end2end file ending in ONNX NonMaxSuppression.
- `PluginPipeline`: an end2end file ending in a TensorRT NMS plugin node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from harness.errors import UserError
from harness.models.source import ModelSource


@dataclass
class Candidates:
    """A batch's NMS candidates: boxes (B, N, 4) xyxy in network-input pixels; scores (B, N, C)
    as the NMS ranks them (class probability × objectness where the head has objectness).
    nms_boxes: the boxes as the NMS node receives them when that is not xyxy (centre-size
    box coding), for the replay; None when they are `boxes`."""

    boxes: np.ndarray
    scores: np.ndarray
    decoded: Any = None  # the source's DecodedCandidates, for SourcePipeline's replay
    nms_boxes: Optional[np.ndarray] = None
    # (B, N, C) bool: the candidate was decoded from an inf / NaN head value (a saturated
    # sigmoid hides it in the score); None when the head maps are not outputs
    nonfinite: Optional[np.ndarray] = None


@dataclass(frozen=True)
class PipelineSettings:
    """What a pipeline's NMS does, in words common to every pipeline, so two can be compared
    setting by setting. None: the pipeline has no such step.

    score_threshold / iou_threshold with whether the test is inclusive (>=) or strict (>);
    pre_topk: the candidate cap before NMS, per image or per class (`pre_topk_scope`);
    max_detections: the cap on the output per image; max_per_class: per class.
    problem: settings with which the pipeline cannot give its intended output (a TensorRT
    BatchedNMS whose keepTopK exceeds topK writes nothing), said once in the verdict.
    """

    score_threshold: Optional[float]
    score_inclusive: bool
    iou_threshold: float
    iou_inclusive: bool
    pre_topk: Optional[int] = None
    pre_topk_scope: str = "image"
    max_detections: Optional[int] = None
    max_per_class: Optional[int] = None
    problem: Optional[str] = None
    # how the NMS computes IoU: "plain" (corners, no +1), "mmcv" (plain, on boxes offset by
    # class in float32, which rounds tiny boxes), "+1 px" (BatchedNMS unnormalised)
    iou_formula: str = "plain"

    # the settings two pipelines can differ in, with the words a report uses for them
    COMPARED = {"score_threshold": "score threshold", "iou_threshold": "IoU threshold",
                "pre_topk": "pre-NMS top-k", "max_detections": "max detections",
                "max_per_class": "max per class"}

    def differences(self, other: "PipelineSettings") -> dict[str, tuple[Any, Any]]:
        """setting → (this value, other value) for every compared setting that differs."""
        out = {}
        for name in self.COMPARED:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs and not (isinstance(mine, float) and isinstance(theirs, float)
                                       and np.float32(mine) == np.float32(theirs)):
                out[name] = (mine, theirs)
        return out


@dataclass
class Replayed:
    """One image through one pipeline: detections in original pixels (box_index = candidate
    row, trace = every candidate's fate), the candidates it ranked (boxes xyxy), and its NMS
    settings (per_class False for a class-agnostic NMS)."""

    result: Any
    boxes: np.ndarray
    scores: np.ndarray
    settings: PipelineSettings
    per_class: bool = True
    # (box, class) pairs the side's own output holds, when that output is not the replay's
    # (the PyTorch reference: mmyolo's own detections, whose tie order the replay may not share)
    output_pairs: Optional[set] = field(default=None, repr=False)
    # (N, C) bool: candidates decoded from inf / NaN head values (Candidates.nonfinite)
    nonfinite: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def iou_threshold(self) -> float:
        return self.settings.iou_threshold

    def outputs_pair(self, box: int, cls: int) -> bool:
        """Whether the side's own output holds candidate (box, cls)."""
        from harness.nms.trace import FateKind

        if self.output_pairs is None:
            return self.result.trace.fate(box, cls).kind == FateKind.KEPT
        return (box, cls) in self.output_pairs


def nonfinite_candidates(outputs: dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """(B, N, C) bool from raw head maps (`cls_scores.i`, `bbox_preds.i`, `objectnesses.i`):
    a candidate whose class logit, box deltas or objectness is inf / NaN, flattened in the
    decoder's order (level, then h, w, anchor); None without head maps."""
    def flat(kind: str, width: int) -> Optional[np.ndarray]:
        levels = sorted((int(k.rpartition(".")[2]), v) for k, v in outputs.items()
                        if k.rpartition(".")[0] == kind and k.rpartition(".")[2].isdigit())
        if not levels:
            return None
        maps = [~np.isfinite(v).transpose(0, 2, 3, 1).reshape(v.shape[0], -1, width)
                for _, v in levels]
        return np.concatenate(maps, axis=1)

    cls, deltas = outputs.get("cls_scores.0"), outputs.get("bbox_preds.0")
    if cls is None or deltas is None:
        return None
    anchors = deltas.shape[1] // 4  # the decoder reads 4 deltas per anchor
    boxes = flat("bbox_preds", 4)
    bad = flat("cls_scores", cls.shape[1] // anchors)
    bad = bad | boxes.any(axis=2, keepdims=True)
    obj = flat("objectnesses", 1)
    if obj is not None:
        bad = bad | obj
    return bad


def centre_size_to_corners(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) [cx, cy, w, h] → [x1, y1, x2, y2], float32."""
    b = np.asarray(boxes, np.float32)
    half = b[..., 2:] / np.float32(2)
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


class Pipeline:
    name = "pipeline"
    per_class = True
    settings: PipelineSettings

    def candidates(self, outputs: dict[str, np.ndarray], backend: Any,
                   inputs: np.ndarray) -> Candidates:
        raise NotImplementedError

    def replay(self, cands: Candidates, metas: Sequence[Any]) -> list[Replayed]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _scored(scores: np.ndarray, objectness: Optional[np.ndarray]) -> np.ndarray:
    if objectness is None:
        return np.asarray(scores, np.float32)
    return np.asarray(scores, np.float32) * np.asarray(objectness, np.float32)[..., None]


class SourcePipeline(Pipeline):
    """The model source's decode + NMS with its own settings (mmyolo: predict_by_feat with the
    model's test_cfg), on head outputs or decoded outputs. Named after the source's framework
    ("mmyolo")."""

    def __init__(self, model: ModelSource):
        self.model = model
        self.name = model.framework
        nms = model.nms
        # mmyolo's / mmcv's semantics (docs/nms-semantics.md): strict tests, nms_pre over (box, class)
        # pairs, IoU on class-offset boxes; yolox_style keeps every survivor
        self.settings = PipelineSettings(
            score_threshold=nms.score_thr, score_inclusive=False,
            iou_threshold=nms.iou_threshold, iou_inclusive=False, pre_topk=nms.nms_pre,
            max_detections=None if nms.yolox_style else nms.max_per_img, iou_formula="mmcv")

    def candidates(self, outputs, backend, inputs):
        decoded = self.model.decode(outputs)  # decoded outputs as they are, else decoded
        return Candidates(boxes=np.asarray(decoded.boxes, np.float32),
                          scores=_scored(decoded.scores, decoded.objectness), decoded=decoded,
                          nonfinite=nonfinite_candidates(outputs))

    def replay(self, cands, metas):
        # mmyolo filters on objectness before multiplying it in: replay from the decoded parts,
        # by the source's own numpy reference
        results = self.model.detections(cands.decoded, metas, trace=True)
        return [Replayed(r, cands.boxes[i], cands.scores[i], self.settings,
                         nonfinite=None if cands.nonfinite is None else cands.nonfinite[i])
                for i, r in enumerate(results)]

    def describe(self):
        return {"kind": self.model.framework, **asdict(self.model.nms)}


# the name compare.py imports and checks with isinstance
MmyoloPipeline = SourcePipeline


class OnnxNmsPipeline(Pipeline):
    """ONNX NonMaxSuppression, per class, `max_output_boxes_per_class` per class and no
    overall limit; onnxruntime's semantics (docs/nms-semantics.md)."""

    name = "onnx"

    def __init__(self, node: Any, constants: dict[str, np.ndarray]):
        def const(i: int, default: Any) -> Any:
            if len(node.input) > i and node.input[i]:
                if node.input[i] not in constants:
                    raise UserError(f"NonMaxSuppression node {node.name!r}: input "
                                    f"{node.input[i]!r} is not a constant; the harness cannot "
                                    "replay it")
                return constants[node.input[i]].reshape(-1)[0].item()
            return default

        attrs = {a.name: a.i for a in node.attribute}
        self.center_point_box = int(attrs.get("center_point_box", 0))
        self.max_per_class = int(const(2, 0))
        self.iou_threshold = float(const(3, 0.0))
        score = const(4, None)
        self.score_threshold = None if score is None else float(score)
        self.boxes_name, self.scores_name = node.input[0], node.input[1]
        self.settings = PipelineSettings(
            score_threshold=self.score_threshold, score_inclusive=False,
            iou_threshold=self.iou_threshold, iou_inclusive=False,
            max_per_class=self.max_per_class,
            problem="max_output_boxes_per_class 0 → no detections (ONNX selects nothing)"
            if self.max_per_class <= 0 else None)

    def candidates(self, outputs, backend, inputs):
        # the file's own outputs carry the NMS inputs (boxes (B, N, 4), scores (B, N, C))
        boxes = np.asarray(outputs["boxes"], np.float32)
        if self.center_point_box:
            return Candidates(centre_size_to_corners(boxes),
                              np.asarray(outputs["scores"], np.float32), nms_boxes=boxes)
        return Candidates(boxes, np.asarray(outputs["scores"], np.float32))

    def replay(self, cands, metas):
        from harness.export.outputs import to_original_pixels
        from harness.nms import NmsResult, onnx_non_max_suppression

        out = onnx_non_max_suppression(
            cands.boxes if cands.nms_boxes is None else cands.nms_boxes,
            np.ascontiguousarray(cands.scores.transpose(0, 2, 1)),
            self.max_per_class, self.iou_threshold, self.score_threshold,
            center_point_box=self.center_point_box, trace=True)
        replays = []
        for i, (r, meta) in enumerate(zip(out.results, metas)):
            order = np.argsort(-r.scores, kind="stable")  # read best first, as the harness does
            res = NmsResult(to_original_pixels(r.boxes[order], meta), r.scores[order],
                            r.labels[order], r.box_index[order], r.trace)
            replays.append(Replayed(res, cands.boxes[i], cands.scores[i], self.settings))
        return replays

    def describe(self):
        return {"kind": "onnx", "max_output_boxes_per_class": self.max_per_class,
                "iou_threshold": self.iou_threshold, "score_threshold": self.score_threshold,
                "center_point_box": self.center_point_box}


class PluginPipeline(Pipeline):
    """A TensorRT NMS plugin node (EfficientNMS_TRT, BatchedNMS(Dynamic)_TRT), replayed by the
    harness's kernel from the node's own attributes on the node's input tensors."""

    def __init__(self, node: Any):
        from harness.nms.plugin_nodes import node_attributes

        from harness.nms import EFFICIENT_NMS_CAP

        self.node = node
        self.name = node.op_type
        self.attrs = a = node_attributes(node)
        self.box_coding = 0
        if node.op_type == "EfficientNMS_TRT":
            self.per_class = not bool(a.get("class_agnostic", 0))
            self.box_coding = int(a.get("box_coding", 0))
            # EfficientNMS_TRT: >= tests, one fixed cap before NMS across classes (docs/nms-semantics.md)
            self.settings = PipelineSettings(
                score_threshold=float(a.get("score_threshold", 0.0)), score_inclusive=True,
                iou_threshold=float(a.get("iou_threshold", 0.5)), iou_inclusive=True,
                pre_topk=EFFICIENT_NMS_CAP, max_detections=int(a.get("max_output_boxes", 0)))
        else:
            top_k, keep = int(a.get("topK", 0)), int(a.get("keepTopK", 0))
            self.settings = PipelineSettings(
                score_threshold=float(a.get("scoreThreshold", 0.0)), score_inclusive=False,
                iou_threshold=float(a.get("iouThreshold", 0.5)), iou_inclusive=False,
                pre_topk=top_k, pre_topk_scope="class", max_detections=keep,
                iou_formula="plain" if int(a.get("isNormalized", 1)) else "+1 px",
                problem=f"keepTopK {keep} > topK {top_k} → no detections (the plugin's gather "
                        "writes nothing)" if keep > top_k else None)
        self.inputs = [n for n in node.input if n]

    def candidates(self, outputs, backend, inputs):
        values = backend.intermediates(inputs, self.inputs[:2])
        boxes = np.asarray(values[self.inputs[0]], np.float32)
        b, n = boxes.shape[:2]
        if boxes.ndim == 4 and boxes.shape[2] != 1:
            raise UserError(f"{self.name} node {self.node.name!r} has per-class boxes; the "
                            "harness compares shared boxes only")
        boxes = boxes.reshape(b, n, 4)
        scores = np.asarray(values[self.inputs[1]], np.float32)
        if self.box_coding == 1:  # centre-size in, corners compared
            return Candidates(centre_size_to_corners(boxes), scores, nms_boxes=boxes)
        return Candidates(boxes, scores)

    def replay(self, cands, metas):
        from harness.nms.plugin_nodes import PLUGIN_KERNELS
        from harness.export.outputs import to_original_pixels
        from harness.nms import NmsResult

        kernel = PLUGIN_KERNELS[(self.node.domain, self.node.op_type)]
        boxes = cands.boxes if cands.nms_boxes is None else cands.nms_boxes
        if self.node.op_type != "EfficientNMS_TRT":
            boxes = boxes[:, :, None]
        _, full = kernel(self.node, [boxes, cands.scores], True)
        replays = []
        for i, (r, meta) in enumerate(zip(full.results, metas)):
            res = NmsResult(to_original_pixels(r.boxes, meta), r.scores, r.labels,
                            r.box_index, r.trace)
            replays.append(Replayed(res, cands.boxes[i], cands.scores[i], self.settings,
                                    self.per_class))
        return replays

    def describe(self):
        return {"kind": self.name, **{k: v for k, v in self.attrs.items()
                                      if isinstance(v, (int, float, str))}}


def pipeline_for(model: ModelSource, onnx_model: Any) -> Pipeline:
    """The pipeline a file's outputs go through: its NMS node if it has one, else the model
    source's own."""
    from onnx import numpy_helper

    for node in onnx_model.graph.node:
        if node.op_type == "NonMaxSuppression":
            constants = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
            for n in onnx_model.graph.node:
                if n.op_type == "Constant" and n.attribute:
                    constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            return OnnxNmsPipeline(node, constants)
        if node.domain == "TRT":
            return PluginPipeline(node)
    return SourcePipeline(model)
