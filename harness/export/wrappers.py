"""The end2end variant's graph: the model source's `decoded` export module with one NMS node
after it. The source's own variants (`raw`, `decoded`) are its export modules
(ModelSource.export_module); this module only adds the NMS.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.export.nms_ops import (
    BatchedNmsAttributes, BatchedNmsDynamicOp, EfficientNmsAttributes, EfficientNmsOp,
    OnnxNmsOp,
)
from harness.export.variants import END2END_OUTPUTS, End2EndNms
from harness.models.source import ModelSource


class End2EndModule(nn.Module):
    """images → detections in the chosen NMS's own output format.

    Scores fed to NMS are class probability × objectness where the head has objectness
    (easydeploy's DeployModel). Outputs by kind:
    - onnx: boxes (B, N, 4) xyxy, scores (B, N, C), selected_indices (M, 3) int64 rows
      (batch, class, box) from the standard NonMaxSuppression (which takes scores as
      (B, C, N)); detection j is boxes[b, box], scores[b, box, class].
    - efficient: num_detections (B, 1) int32, detection_boxes (B, K, 4) xyxy,
      detection_scores (B, K), detection_classes (B, K) int32 (TRT::EfficientNMS_TRT).
    - batched: num_detections (B, 1) int32, nmsed_boxes (B, K, 4) xyxy, nmsed_scores (B, K),
      nmsed_classes (B, K) float (TRT::BatchedNMSDynamic_TRT).
    """

    def __init__(self, model: ModelSource, nms: End2EndNms):
        super().__init__()
        decoded = model.export_module("decoded")
        # the decoded module's children under their own names (not under `decoded.`), so
        # ONNX scopes stay the detector's module paths, as in the raw and decoded files
        for name, child in decoded.named_children():
            self.add_module(name, child)
        self._decoded = [decoded]  # a list, so nn.Module does not register it twice
        self.num_classes = model.num_classes
        self.nms = nms

    def forward_named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        decoded = self._decoded[0].forward_named(images)
        boxes, scores = decoded["boxes"], decoded["scores"]
        if "objectness" in decoded:
            scores = scores * decoded["objectness"].unsqueeze(-1)
        # NMS runs in float32 whatever the network's precision (ONNX NonMaxSuppression has
        # no fp16 kernel in onnxruntime; the harness's kernels are fp32)
        if boxes.dtype != torch.float32:
            boxes, scores = boxes.float(), scores.float()
        names = END2END_OUTPUTS[self.nms.kind]
        outputs = _END2END_HEADS[self.nms.kind](self.nms, boxes, scores, self.num_classes)
        return dict(zip(names, outputs))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward_named(images).values())


def _onnx_head(nms: End2EndNms, boxes: torch.Tensor, scores: torch.Tensor, num_classes: int):
    if nms.pre_topk is not None:
        boxes, scores = pre_nms_topk(boxes, scores, nms.pre_topk)
    selected = OnnxNmsOp.apply(boxes, scores.transpose(1, 2), nms.keep_topk,
                               nms.iou_threshold, nms.score_threshold)
    return boxes, scores, selected


def pre_nms_topk(boxes: torch.Tensor, scores: torch.Tensor, k: int):
    """The `k` candidates with the best class score of each image, best first (mmdeploy's
    pre_top_k): ReduceMax → TopK → Gather on the flattened batch. K is a constant,
    min(k, candidates), as TensorRT needs it; the graph's candidates stay readable upstream."""
    b, n = scores.shape[0], scores.shape[1]
    k = min(int(k), int(n))
    _, index = scores.amax(dim=2).topk(k, dim=1)
    flat = (index + torch.arange(b, device=index.device).unsqueeze(1) * n).reshape(-1)
    return (boxes.reshape(-1, 4)[flat].reshape(b, k, 4),
            scores.reshape(-1, scores.shape[2])[flat].reshape(b, k, scores.shape[2]))


def _efficient_head(nms: End2EndNms, boxes: torch.Tensor, scores: torch.Tensor,
                    num_classes: int):
    attrs = EfficientNmsAttributes(score_threshold=nms.score_threshold,
                                   iou_threshold=nms.iou_threshold,
                                   max_output_boxes=nms.keep_topk)
    return EfficientNmsOp.apply(boxes, scores, attrs)


def _batched_head(nms: End2EndNms, boxes: torch.Tensor, scores: torch.Tensor,
                  num_classes: int):
    attrs = BatchedNmsAttributes(num_classes=num_classes, top_k=int(nms.pre_topk),
                                 keep_top_k=nms.keep_topk, score_threshold=nms.score_threshold,
                                 iou_threshold=nms.iou_threshold)
    # shareLocation: one box per anchor for all classes, as (B, N, 1, 4)
    return BatchedNmsDynamicOp.apply(boxes.unsqueeze(2), scores, attrs)


_END2END_HEADS = {"onnx": _onnx_head, "efficient": _efficient_head, "batched": _batched_head}
