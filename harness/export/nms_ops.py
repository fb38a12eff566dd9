"""NMS as one ONNX node: autograd Functions whose `symbolic` emits the standard
NonMaxSuppression or a TensorRT plugin node with the plugin's own attributes (as easydeploy
does); `forward` only makes correctly shaped placeholders so tracing can go on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The plugins' registered version; onnx-tensorrt looks plugins up by (name, version).
PLUGIN_VERSION = "1"
TRT_DOMAIN = "TRT"


@dataclass(frozen=True)
class EfficientNmsAttributes:
    """EfficientNMS_TRT attributes (docs/nms-semantics.md "TensorRT EfficientNMS_TRT").

    class_agnostic is left out of the node (as easydeploy does, and as TensorRT < 8.6
    requires): the plugin then runs NMS per class.
    """

    score_threshold: float
    iou_threshold: float
    max_output_boxes: int
    background_class: int = -1
    box_coding: int = 0  # 0: corners; the harness always feeds xyxy boxes
    score_activation: int = 0  # scores are already probabilities

    def node_attributes(self) -> dict[str, Any]:
        """Keyword arguments for `g.op`, typed with the exporter's _f/_i/_s suffixes."""
        return {
            "score_threshold_f": float(self.score_threshold),
            "iou_threshold_f": float(self.iou_threshold),
            "max_output_boxes_i": int(self.max_output_boxes),
            "background_class_i": int(self.background_class),
            "box_coding_i": int(self.box_coding),
            "score_activation_i": int(self.score_activation),
            "plugin_version_s": PLUGIN_VERSION,
        }


@dataclass(frozen=True)
class BatchedNmsAttributes:
    """BatchedNMSDynamic_TRT attributes as easydeploy's TENSORRT7 backend sets them
    (docs/nms-semantics.md "mmyolo easydeploy" and "TensorRT BatchedNMS_TRT / BatchedNMSDynamic_TRT").

    is_normalized 0 with caffe_semantics 1 means IoU with +1 px: that is the plugin's
    behaviour on pixel boxes, kept here on purpose because it is what users deploy.
    """

    num_classes: int
    top_k: int
    keep_top_k: int
    score_threshold: float
    iou_threshold: float
    share_location: int = 1
    background_label_id: int = -1
    is_normalized: int = 0
    clip_boxes: int = 0
    score_bits: int = 16
    caffe_semantics: int = 1

    def node_attributes(self) -> dict[str, Any]:
        return {
            "shareLocation_i": int(self.share_location),
            "backgroundLabelId_i": int(self.background_label_id),
            "numClasses_i": int(self.num_classes),
            "topK_i": int(self.top_k),
            "keepTopK_i": int(self.keep_top_k),
            "scoreThreshold_f": float(self.score_threshold),
            "iouThreshold_f": float(self.iou_threshold),
            "isNormalized_i": int(self.is_normalized),
            "clipBoxes_i": int(self.clip_boxes),
            "scoreBits_i": int(self.score_bits),
            "caffeSemantics_i": int(self.caffe_semantics),
            "plugin_version_s": PLUGIN_VERSION,
        }


class EfficientNmsOp(torch.autograd.Function):
    """boxes (B, N, 4) xyxy, scores (B, N, C) → num_detections (B, 1) int32,
    detection_boxes (B, K, 4), detection_scores (B, K), detection_classes (B, K) int32."""

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor,
                attrs: EfficientNmsAttributes) -> tuple[torch.Tensor, ...]:
        b, k = boxes.shape[0], attrs.max_output_boxes
        return (torch.zeros(b, 1, dtype=torch.int32),
                torch.zeros(b, k, 4, dtype=boxes.dtype),
                torch.zeros(b, k, dtype=scores.dtype),
                torch.zeros(b, k, dtype=torch.int32))

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, attrs: EfficientNmsAttributes) -> Any:
        outs = g.op(f"{TRT_DOMAIN}::EfficientNMS_TRT", boxes, scores, outputs=4,
                    **attrs.node_attributes())
        return _typed(outs, boxes, attrs.max_output_boxes,
                      (torch.int32, torch.float32, torch.float32, torch.int32))


class BatchedNmsDynamicOp(torch.autograd.Function):
    """boxes (B, N, 1, 4) xyxy, scores (B, N, C) → num_detections (B, 1) int32,
    nmsed_boxes (B, K, 4), nmsed_scores (B, K), nmsed_classes (B, K) float (the plugin's types)."""

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor,
                attrs: BatchedNmsAttributes) -> tuple[torch.Tensor, ...]:
        b, k = boxes.shape[0], attrs.keep_top_k
        return (torch.zeros(b, 1, dtype=torch.int32),
                torch.zeros(b, k, 4, dtype=boxes.dtype),
                torch.zeros(b, k, dtype=scores.dtype),
                torch.zeros(b, k, dtype=scores.dtype))

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, attrs: BatchedNmsAttributes) -> Any:
        outs = g.op(f"{TRT_DOMAIN}::BatchedNMSDynamic_TRT", boxes, scores, outputs=4,
                    **attrs.node_attributes())
        return _typed(outs, boxes, attrs.keep_top_k,
                      (torch.int32, torch.float32, torch.float32, torch.float32))


def _typed(outs: tuple[Any, ...], like: Any, k: int,
           dtypes: tuple[torch.dtype, ...]) -> tuple[Any, ...]:
    """Give a plugin's four outputs their types and static sizes (batch left dynamic):
    ONNX shape inference knows nothing of custom ops, and TensorRT's parser reads these."""
    sizes = ([None, 1], [None, k, 4], [None, k], [None, k])
    for out, size, dtype in zip(outs, sizes, dtypes):
        out.setType(like.type().with_dtype(dtype).with_sizes(size))
    return outs


class OnnxNmsOp(torch.autograd.Function):
    """Standard ONNX NonMaxSuppression: boxes (B, N, 4) corners, scores (B, C, N) →
    selected_indices (M, 3) int64 rows (batch, class, box); center_point_box 0."""

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor,
                max_output_boxes_per_class: int, iou_threshold: float,
                score_threshold: float) -> torch.Tensor:
        return torch.zeros(0, 3, dtype=torch.int64)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_output_boxes_per_class: int,
                 iou_threshold: float, score_threshold: float) -> Any:
        # the op takes its limits as tensor inputs, not attributes
        max_out = g.op("Constant", value_t=torch.tensor([max_output_boxes_per_class],
                                                        dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, score,
                    center_point_box_i=0)
