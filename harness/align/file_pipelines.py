"""The pipelines of files that end in their own NMS — whoever exported them (the harness,
mmyolo's easydeploy, mmdeploy): the candidates are read from the tensors the file's layout
names (harness.artifacts.layout: before any pre-NMS TopK, in the file's own box coding), and
the file's NMS is replayed in trace mode from its node's attributes and inputs — including a
pre-NMS TopK over each box's best score and a keep cut after the NMS, with the K values the
graph computed when it ran.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from harness.align.pipelines import (
    Candidates, Pipeline, PipelineSettings, Replayed, centre_size_to_corners,
)
from harness.errors import UserError


class FilePipeline(Pipeline):
    """What both kinds share: the layout, the tensors to read, and reading them."""

    def __init__(self, node: Any, layout: Any, num_classes: int):
        self.node = node
        self.layout = layout
        self.num_classes = num_classes
        self.name = type(self).__dict__.get("name", node.op_type)  # "onnx" or the op
        ks = [t for t in (layout.pre_topk, layout.keep_topk) if t is not None]
        # what a debug engine marks / onnxruntime adds as outputs to read the candidates
        self.inputs = [layout.candidate_boxes, layout.candidate_scores] + [k for _, k in ks]
        self.k_values: dict[str, int] = {}

    def setting(self, name: str, default: Any = None) -> Any:
        s = self.layout.settings.get(name)
        return default if s is None or s.value is None else s.value

    def centre_size(self) -> bool:
        return False

    def candidates(self, outputs, backend, inputs):
        values = backend.intermediates(inputs, self.inputs)
        boxes = np.asarray(values[self.inputs[0]], np.float32)
        scores = np.asarray(values[self.inputs[1]], np.float32)
        b = boxes.shape[0]
        if boxes.ndim == 4 and boxes.shape[2] != 1:
            raise UserError(f"{self.name} node {self.node.name!r} has per-class boxes; the "
                            "harness compares shared boxes only")
        boxes = boxes.reshape(b, -1, 4)
        if scores.ndim == 3 and scores.shape[2] != self.num_classes and \
                scores.shape[1] == self.num_classes:
            scores = np.ascontiguousarray(scores.transpose(0, 2, 1))  # (B, C, N) → (B, N, C)
        if scores.shape[:2] != boxes.shape[:2] or scores.shape[2] != self.num_classes:
            raise UserError(f"{self.name}: candidate tensors {self.inputs[0]} {list(boxes.shape)}"
                            f" and {self.inputs[1]} {list(scores.shape)} are not (B, N, 4) boxes "
                            f"and (B, N, {self.num_classes}) scores")
        for (node_name, k_name) in [t for t in (self.layout.pre_topk, self.layout.keep_topk)
                                    if t is not None]:
            self.k_values[node_name] = int(np.asarray(values[k_name]).reshape(-1)[0])
        if self.centre_size():
            return Candidates(centre_size_to_corners(boxes), scores, nms_boxes=boxes)
        return Candidates(boxes, scores)

    def describe(self):
        doc = {"kind": self.name, **self.layout.describe()}
        doc.update({k: v.value for k, v in self.layout.settings.items()
                    if isinstance(v.value, (int, float, str))})
        if self.k_values:
            doc["k_read_when_run"] = dict(self.k_values)
        return doc


class OnnxNmsPipeline(FilePipeline):
    """ONNX NonMaxSuppression (onnxruntime's semantics, docs/nms-semantics.md): per class,
    `max_output_boxes_per_class` per class; with mmdeploy's pre-NMS TopK over each box's best
    score before it and its keep TopK over the selected scores after it, when the file has
    them; the rest read best first (easydeploy's sort)."""

    name = "onnx"

    def centre_size(self) -> bool:
        return bool(self.setting("center_point_box", 0))

    @property
    def settings(self) -> PipelineSettings:  # type: ignore[override]
        max_pc = int(self.setting("max_output_boxes_per_class", 0))
        # the graph's own bound where it has one (min(5000, N)), else what it computed
        pre = self.layout.pre_topk and (self.setting("pre_topk") or
                                        self.k_values.get(self.layout.pre_topk[0]))
        keep = self.layout.keep_topk and (self.setting("keep_topk") or
                                          self.k_values.get(self.layout.keep_topk[0]))
        score = self.setting("score_threshold")
        return PipelineSettings(
            score_threshold=None if score is None else float(score), score_inclusive=False,
            iou_threshold=float(self.setting("iou_threshold", 0.0)), iou_inclusive=False,
            pre_topk=pre or None, max_detections=keep or None, max_per_class=max_pc,
            problem="max_output_boxes_per_class 0 → no detections (ONNX selects nothing)"
            if max_pc <= 0 else None)

    def replay(self, cands, metas):
        from harness.export.outputs import to_original_pixels
        from harness.nms import NmsResult, onnx_non_max_suppression
        from harness.nms.greedy import descending_order
        from harness.nms.trace import FateKind

        settings = self.settings
        nms_boxes = cands.boxes if cands.nms_boxes is None else cands.nms_boxes
        n = cands.scores.shape[1]
        replays = []
        for i, meta in enumerate(metas):
            scores = cands.scores[i]
            best = scores.max(axis=1)
            # onnxruntime's TopK: larger first, equal values lower index first
            order = descending_order(best, "stable")
            top = order[:settings.pre_topk] if settings.pre_topk else np.arange(n)
            out = onnx_non_max_suppression(
                nms_boxes[i][top][None], np.ascontiguousarray(scores[top].T[None]),
                int(self.setting("max_output_boxes_per_class", 0)), settings.iou_threshold,
                settings.score_threshold, center_point_box=int(self.centre_size()),
                trace=True).results[0]
            trace = embed_trace(out.trace, top, n)
            if settings.pre_topk:
                cut = order[settings.pre_topk:]
                for c in range(scores.shape[1]):
                    trace.record(cut, np.full(cut.size, c), FateKind.CUT_PRE_NMS_TOPK,
                                 rank=np.arange(settings.pre_topk, n),
                                 limit=settings.pre_topk, score=scores[cut, c])
            rows = top[out.box_index]
            by_score = np.argsort(-out.scores, kind="stable")  # read best first
            rows, labels, kept_scores = rows[by_score], out.labels[by_score], out.scores[by_score]
            keep = settings.max_detections or len(rows)
            if len(rows) > keep:
                trace.record(rows[keep:], labels[keep:], FateKind.CUT_MAX_DETECTIONS,
                             rank=np.arange(keep, len(rows)), limit=keep,
                             score=kept_scores[keep:])
                rows, labels, kept_scores = rows[:keep], labels[:keep], kept_scores[:keep]
            trace.record(rows, labels, FateKind.KEPT, rank=np.arange(len(rows)),
                         score=kept_scores)
            trace.check_complete()
            res = NmsResult(to_original_pixels(cands.boxes[i][rows], meta), kept_scores,
                            labels.astype(np.int64), rows.astype(np.int64), trace)
            replays.append(Replayed(res, cands.boxes[i], scores, settings))
        return replays


def embed_trace(sub: Any, rows: np.ndarray, n: int) -> Any:
    """A trace of `n` boxes holding `sub` (a trace of the boxes `rows`) at those rows, with
    suppressors renumbered; the other rows UNSET for the caller to fill."""
    from harness.nms.trace import Trace

    full = Trace.empty(n, sub.num_classes, sub.pipeline)
    for name in ("code", "rank", "limit", "by_class", "iou", "threshold", "inclusive",
                 "score"):
        getattr(full, name)[rows] = getattr(sub, name)
    full.by_box[rows] = np.where(sub.by_box >= 0, rows[np.maximum(sub.by_box, 0)], -1)
    return full


class PluginPipeline(FilePipeline):
    """A TensorRT NMS plugin node (EfficientNMS_TRT, BatchedNMS(Dynamic)_TRT) or mmdeploy's
    TRTBatchedNMS, replayed by the harness's kernel from the node's own attributes."""

    def __init__(self, node: Any, layout: Any, num_classes: int):
        from harness.nms import EFFICIENT_NMS_CAP

        super().__init__(node, layout, num_classes)
        s = self.setting
        if layout.nms_kind == "efficient":
            self.per_class = not bool(s("class_agnostic", 0))
            # EfficientNMS_TRT: >= tests, one fixed cap before NMS across classes
            self.settings = PipelineSettings(
                score_threshold=float(s("score_threshold", 0.0)), score_inclusive=True,
                iou_threshold=float(s("iou_threshold", 0.5)), iou_inclusive=True,
                pre_topk=EFFICIENT_NMS_CAP, max_detections=int(s("max_output_boxes", 0)))
            return
        mm = layout.nms_kind == "mmdeploy_batched"
        top_k = int(s("topk" if mm else "topK", 0))
        keep = int(s("keep_topk" if mm else "keepTopK", 0))
        plain = mm or bool(int(s("isNormalized", 1)))
        self.settings = PipelineSettings(
            score_threshold=float(s("score_threshold" if mm else "scoreThreshold", 0.0)),
            score_inclusive=False,
            iou_threshold=float(s("iou_threshold" if mm else "iouThreshold", 0.5)),
            iou_inclusive=False, pre_topk=top_k, pre_topk_scope="class", max_detections=keep,
            iou_formula="plain" if plain else
            "+1 px" if int(s("caffeSemantics", 1)) else "+1 px areas",
            problem=_batched_problem(top_k, keep, mm))

    def centre_size(self) -> bool:
        return self.layout.nms_kind == "efficient" and bool(self.setting("box_coding", 0))

    def replay(self, cands, metas):
        from harness.export.outputs import to_original_pixels
        from harness.nms import NmsResult
        from harness.nms.plugin_nodes import PLUGIN_KERNELS

        kernel = PLUGIN_KERNELS[(self.node.domain, self.node.op_type)]
        boxes = cands.boxes if cands.nms_boxes is None else cands.nms_boxes
        if self.layout.nms_kind != "efficient":
            boxes = boxes[:, :, None]
        _, full = kernel(self.node, [boxes, cands.scores], True)
        replays = []
        for i, (r, meta) in enumerate(zip(full.results, metas)):
            xyxy = cands.boxes[i][r.box_index] if len(r) else np.zeros((0, 4), np.float32)
            res = NmsResult(to_original_pixels(xyxy, meta), r.scores, r.labels, r.box_index,
                            r.trace)
            replays.append(Replayed(res, cands.boxes[i], cands.scores[i], self.settings,
                                    self.per_class))
        return replays


def _batched_problem(top_k: int, keep: int, mmdeploy: bool) -> Optional[str]:
    if keep > top_k:
        return (f"keepTopK {keep} > topK {top_k} → no detections (the plugin's gather "
                "writes nothing)")
    limit = 5120 if mmdeploy else 4096
    if top_k > limit:
        return f"topK {top_k} > {limit} → the plugin refuses it (no detections)"
    return None
