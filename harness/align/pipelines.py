"""Each backend's post-processing as a replayable pipeline: where its NMS candidates come from
(decoded head maps, a decoded file's outputs, an NMS node's inputs) and the reference kernel
that replays its NMS in trace mode on its *own* candidates, so every detection it gave or lost
has a recorded fate (harness.nms.trace).

- `MmyoloPipeline`: mmyolo's predict_by_feat (the PyTorch reference, and raw / decoded files,
  whose NMS the harness runs with the model's test_cfg).
- `OnnxNmsPipeline`: an end2end file ending in ONNX NonMaxSuppression.
- `PluginPipeline`: an end2end file ending in a TensorRT NMS plugin node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from harness.errors import UserError


@dataclass
class Candidates:
    """A batch's NMS candidates: boxes (B, N, 4) xyxy in network-input pixels; scores (B, N, C)
    as the NMS ranks them (class probability × objectness where the head has objectness)."""

    boxes: np.ndarray
    scores: np.ndarray
    decoded: Any = None  # mmyolo's DecodedCandidates, for MmyoloPipeline's replay


@dataclass
class Replayed:
    """One image through one pipeline: detections in original pixels (box_index = candidate
    row, trace = every candidate's fate), the candidates it ranked, and how its NMS compares
    boxes (iou_threshold; per_class False for a class-agnostic NMS)."""

    result: Any
    boxes: np.ndarray
    scores: np.ndarray
    iou_threshold: float
    per_class: bool


class Pipeline:
    name = "pipeline"
    per_class = True
    iou_threshold = 0.5

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


class MmyoloPipeline(Pipeline):
    """mmyolo's decode + NMS with the model's test_cfg, on head maps or decoded outputs."""

    name = "mmyolo"

    def __init__(self, model: Any):
        self.model = model
        self.iou_threshold = model.nms.iou_threshold

    def candidates(self, outputs, backend, inputs):
        from harness.export.outputs import head_maps_from_outputs
        from harness.models.mmyolo import DecodedCandidates

        if "boxes" in outputs and "scores" in outputs:
            decoded = DecodedCandidates(outputs["boxes"], outputs["scores"],
                                        outputs.get("objectness"))
        else:
            decoded = self.model.decode(head_maps_from_outputs(outputs))
        return Candidates(boxes=np.asarray(decoded.boxes, np.float32),
                          scores=_scored(decoded.scores, decoded.objectness), decoded=decoded)

    def replay(self, cands, metas):
        # mmyolo filters on objectness before multiplying it in: replay from the decoded parts
        results = self.model.detections(cands.decoded, metas, trace=True)
        return [Replayed(r, cands.boxes[i], cands.scores[i], self.iou_threshold, True)
                for i, r in enumerate(results)]

    def describe(self):
        return {"kind": "mmyolo", **asdict(self.model.nms)}


class OnnxNmsPipeline(Pipeline):
    """ONNX NonMaxSuppression, per class, `max_output_boxes_per_class` per class and no
    overall limit; onnxruntime's semantics (SPEC-nms.md)."""

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

    def candidates(self, outputs, backend, inputs):
        # the file's own outputs carry the NMS inputs (boxes (B, N, 4), scores (B, N, C))
        return Candidates(np.asarray(outputs["boxes"], np.float32),
                          np.asarray(outputs["scores"], np.float32))

    def replay(self, cands, metas):
        from harness.export.outputs import to_original_pixels
        from harness.nms import NmsResult, onnx_non_max_suppression

        out = onnx_non_max_suppression(
            cands.boxes, np.ascontiguousarray(cands.scores.transpose(0, 2, 1)),
            self.max_per_class, self.iou_threshold, self.score_threshold,
            center_point_box=self.center_point_box, trace=True)
        replays = []
        for i, (r, meta) in enumerate(zip(out.results, metas)):
            order = np.argsort(-r.scores, kind="stable")  # read best first, as the harness does
            res = NmsResult(to_original_pixels(r.boxes[order], meta), r.scores[order],
                            r.labels[order], r.box_index[order], r.trace)
            replays.append(Replayed(res, cands.boxes[i], cands.scores[i],
                                    self.iou_threshold, True))
        return replays

    def describe(self):
        return {"kind": "onnx", "max_output_boxes_per_class": self.max_per_class,
                "iou_threshold": self.iou_threshold, "score_threshold": self.score_threshold,
                "center_point_box": self.center_point_box}


class PluginPipeline(Pipeline):
    """A TensorRT NMS plugin node (EfficientNMS_TRT, BatchedNMS(Dynamic)_TRT), replayed by the
    harness's kernel from the node's own attributes on the node's input tensors."""

    def __init__(self, node: Any):
        from harness.backends.trt_plugins import node_attributes

        self.node = node
        self.name = node.op_type
        self.attrs = node_attributes(node)
        if node.op_type == "EfficientNMS_TRT":
            self.iou_threshold = float(self.attrs.get("iou_threshold", 0.5))
            self.per_class = not bool(self.attrs.get("class_agnostic", 0))
        else:
            self.iou_threshold = float(self.attrs.get("iouThreshold", 0.5))
        self.inputs = [n for n in node.input if n]

    def candidates(self, outputs, backend, inputs):
        values = backend.intermediates(inputs, self.inputs[:2])
        boxes = np.asarray(values[self.inputs[0]], np.float32)
        b, n = boxes.shape[:2]
        if boxes.ndim == 4 and boxes.shape[2] != 1:
            raise UserError(f"{self.name} node {self.node.name!r} has per-class boxes; the "
                            "harness compares shared boxes only")
        return Candidates(boxes.reshape(b, n, 4), np.asarray(values[self.inputs[1]], np.float32))

    def replay(self, cands, metas):
        from harness.backends.trt_plugins import PLUGIN_KERNELS
        from harness.export.outputs import to_original_pixels
        from harness.nms import NmsResult

        kernel = PLUGIN_KERNELS[(self.node.domain, self.node.op_type)]
        boxes = cands.boxes if self.node.op_type == "EfficientNMS_TRT" else cands.boxes[:, :, None]
        _, full = kernel(self.node, [boxes, cands.scores], True)
        replays = []
        for i, (r, meta) in enumerate(zip(full.results, metas)):
            res = NmsResult(to_original_pixels(r.boxes, meta), r.scores, r.labels,
                            r.box_index, r.trace)
            replays.append(Replayed(res, cands.boxes[i], cands.scores[i], self.iou_threshold,
                                    self.per_class))
        return replays

    def describe(self):
        return {"kind": self.name, **{k: v for k, v in self.attrs.items()
                                      if isinstance(v, (int, float, str))}}


def pipeline_for(model: Any, onnx_model: Any) -> Pipeline:
    """The pipeline a file's outputs go through: its NMS node if it has one, else mmyolo's."""
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
    return MmyoloPipeline(model)
