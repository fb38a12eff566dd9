"""The detector as each export variant's graph (raw maps, decoded candidates, + one NMS node),
holding the detector's own backbone / neck / bbox_head under those names so ONNX node names
keep module scopes (`/backbone/stem/conv/Conv`); the PyTorch backend names outputs alike.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.export.nms_ops import (
    BatchedNmsAttributes, BatchedNmsDynamicOp, EfficientNmsAttributes, EfficientNmsOp,
    OnnxNmsOp,
)
from harness.export.variants import END2END_OUTPUTS, End2EndNms


def head_map_outputs(raw: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """MmyoloModel.raw_outputs' {kind: [level maps]} as flat names `cls_scores.0`, ...
    (kinds in raw_outputs' order, levels ascending): the `raw` variant's output names."""
    return {f"{kind}.{level}": t for kind, maps in raw.items() for level, t in enumerate(maps)}


class RawModule(nn.Module):
    """images (B, 3, H, W) → every head map: cls_scores.l (B, A*C, H_l, W_l),
    bbox_preds.l (B, A*4, H_l, W_l) (or the head's own channel count),
    objectnesses.l (B, A, H_l, W_l) for heads with objectness."""

    def __init__(self, model: Any):
        super().__init__()
        detector = model.module
        # the detector's submodules under their own names: ONNX scopes = module paths
        self.backbone = detector.backbone
        self.neck = getattr(detector, "neck", None)
        self.bbox_head = detector.bbox_head
        self._model = [model]  # a list, so nn.Module does not register it twice

    @property
    def model(self) -> Any:
        return self._model[0]

    def head_maps(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return self.model.raw_outputs(images)

    def forward_named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return head_map_outputs(self.head_maps(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward_named(images).values())


class DecodedModule(RawModule):
    """images → boxes (B, N, 4) xyxy in input pixels, scores (B, N, C) class probabilities
    (sigmoid, not multiplied by objectness), and objectness (B, N) for heads that have it:
    exactly MmyoloModel.decode_torch, i.e. YOLOv5Head.predict_by_feat before filtering, so
    the harness can run mmyolo's own NMS on these outputs."""

    def forward_named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes, scores, objectness = self.model.decode_torch(self.head_maps(images))
        out = {"boxes": boxes, "scores": scores}
        if objectness is not None:
            out["objectness"] = objectness
        return out


class End2EndModule(DecodedModule):
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

    def __init__(self, model: Any, nms: End2EndNms):
        super().__init__(model)
        self.nms = nms

    def forward_named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        decoded = super().forward_named(images)
        boxes, scores = decoded["boxes"], decoded["scores"]
        if "objectness" in decoded:
            scores = scores * decoded["objectness"].unsqueeze(-1)
        # NMS runs in float32 whatever the network's precision (ONNX NonMaxSuppression has
        # no fp16 kernel in onnxruntime; the harness's kernels are fp32)
        if boxes.dtype != torch.float32:
            boxes, scores = boxes.float(), scores.float()
        names = END2END_OUTPUTS[self.nms.kind]
        outputs = _END2END_HEADS[self.nms.kind](self.nms, boxes, scores, self.model.num_classes)
        return dict(zip(names, outputs))


def _onnx_head(nms: End2EndNms, boxes: torch.Tensor, scores: torch.Tensor, num_classes: int):
    selected = OnnxNmsOp.apply(boxes, scores.transpose(1, 2), nms.keep_topk,
                               nms.iou_threshold, nms.score_threshold)
    return boxes, scores, selected


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
