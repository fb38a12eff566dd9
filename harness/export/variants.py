"""The export variants and the output contract of each: which names a file's outputs carry and
what they hold. Light on purpose (no torch), so readers of exported files can import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

VARIANTS = ("raw", "decoded", "end2end", "split")
NMS_CHOICES = ("onnx", "efficient", "batched")

# Output names of each end2end choice, in graph order: the plugins' own output names, and for
# the ONNX op the candidates its selected_indices point into.
END2END_OUTPUTS = {
    "onnx": ("boxes", "scores", "selected_indices"),
    "efficient": ("num_detections", "detection_boxes", "detection_scores", "detection_classes"),
    "batched": ("num_detections", "nmsed_boxes", "nmsed_scores", "nmsed_classes"),
}


# the second graph input of files whose stages depend on each image's shape (two-stage
# detectors clip proposals to it): (B, 2) float32 rows (h, w) of the resized image before pad
IMG_SHAPE_INPUT = "img_shape"


def img_shape_rows(metas: Any, batch: int, hw: Any) -> Any:
    """The IMG_SHAPE_INPUT array for a batch: each ImageMeta's img_shape, or without metas
    the whole input (h, w) for every image."""
    import numpy as np

    if metas is None:
        return np.tile(np.asarray(hw, np.float32)[None], (batch, 1))
    return np.asarray([tuple(m.img_shape)[:2] for m in metas], np.float32)


@dataclass(frozen=True)
class End2EndNms:
    """The NMS an end2end file ends with, with every number resolved.

    kind: "onnx" | "efficient" | "batched". pre_topk: BatchedNMS's topK; for onnx an optional
    pre-NMS TopK node (mmdeploy's pre_top_k); EfficientNMS ignores it (its own fixed cap).
    keep_topk: ONNX max_output_boxes_per_class, EfficientNMS max_output_boxes, BatchedNMS
    keepTopK.
    """

    kind: str
    keep_topk: int
    iou_threshold: float
    score_threshold: float
    pre_topk: Union[int, None] = None
