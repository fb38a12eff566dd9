"""Reference NMS kernels in numpy, one per pipeline a deployed mmyolo model meets (mmyolo/mmcv,
ONNX NonMaxSuppression as onnxruntime and TensorRT run it, EfficientNMS_TRT, BatchedNMS_TRT),
each with a trace mode that records every candidate's fate. Semantics: docs/nms-semantics.md.
"""
from __future__ import annotations

from harness.nms.batched_nms import BATCHED_NMS_MAX_TOPK, BatchedNmsOutput, batched_nms_trt
from harness.nms.efficient_nms import (
    EFFICIENT_NMS_CAP, EFFICIENT_NMS_CAP_TRT84, EfficientNmsOutput, efficient_nms_trt,
    logit_threshold,
)
from harness.nms.greedy import TieOrder, descending_order
from harness.nms.mmyolo import MMCV_SPLIT_THR, mmcv_batched_nms, mmyolo_nms
from harness.nms.onnx_nms import TRT_TOPK_BOX_LIMIT, OnnxNmsOutput, onnx_non_max_suppression
from harness.nms.trace import Fate, FateKind, NmsResult, Trace

__all__ = [
    "BATCHED_NMS_MAX_TOPK", "EFFICIENT_NMS_CAP", "EFFICIENT_NMS_CAP_TRT84", "MMCV_SPLIT_THR",
    "TRT_TOPK_BOX_LIMIT", "BatchedNmsOutput", "EfficientNmsOutput", "Fate", "FateKind",
    "NmsResult", "OnnxNmsOutput", "TieOrder", "Trace", "batched_nms_trt", "descending_order",
    "efficient_nms_trt", "logit_threshold", "mmcv_batched_nms", "mmyolo_nms",
    "onnx_non_max_suppression",
]
