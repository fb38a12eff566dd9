"""TensorRT plugin nodes computed on the CPU by harness.nms's reference kernels, from the node's
own attributes, so an end2end file made for TensorRT gives through onnxruntime the detections
TensorRT's plugin would give (docs/nms-semantics.md, EfficientNMS_TRT and BatchedNMS sections).
Both plugins are deprecated in TensorRT (plugin/README.md): BatchedNMS(Dynamic)_TRT since 9.0
and gone from 11.0, EfficientNMS_TRT since 10.12 (INMSLayer replaces them).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from harness.errors import UserError

# a node's (outputs in graph order, the kernel's full result with per-image NmsResults)
PluginRun = tuple[list[np.ndarray], Any]

# the attributes each plugin creator requires (validateRequiredAttributesExist in
# plugin/efficientNMSPlugin/efficientNMSPlugin.cpp and plugin/batchedNMSPlugin/
# batchedNMSPlugin.cpp, unchanged from TensorRT 8.6.1 to 10.13, and to 11.0 for EfficientNMS):
# TensorRT refuses a node without one, so the emulation does too
EFFICIENT_NMS_REQUIRED = ("score_threshold", "iou_threshold", "max_output_boxes",
                          "background_class", "score_activation", "box_coding")
BATCHED_NMS_REQUIRED = ("shareLocation", "backgroundLabelId", "numClasses", "topK", "keepTopK",
                        "scoreThreshold", "iouThreshold")


def node_attributes(node: Any) -> dict[str, Any]:
    """A NodeProto's attributes as Python values (strings decoded)."""
    from onnx import helper

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _required(node: Any, attrs: dict[str, Any], names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in attrs]
    if missing:
        raise UserError(f"{node.op_type} node {node.name!r} lacks attribute(s) "
                        f"{', '.join(missing)}; TensorRT would refuse it too")


def run_efficient_nms(node: Any, inputs: list[np.ndarray], trace: bool = False) -> PluginRun:
    """TRT::EfficientNMS_TRT: inputs boxes (B, N, 4) or (B, N, C, 4), scores (B, N, C) →
    num_detections (B, 1) int32, detection_boxes (B, K, 4), detection_scores (B, K),
    detection_classes (B, K) int32."""
    from harness.nms import efficient_nms_trt

    attrs = node_attributes(node)
    _required(node, attrs, EFFICIENT_NMS_REQUIRED)
    if len(inputs) > 2:
        raise UserError(f"EfficientNMS_TRT node {node.name!r} has an anchors input (the fused "
                        "box decoder), which the harness does not emulate")
    try:
        out = efficient_nms_trt(
            inputs[0], inputs[1], score_threshold=float(attrs["score_threshold"]),
            iou_threshold=float(attrs["iou_threshold"]),
            max_output_boxes=int(attrs["max_output_boxes"]),
            background_class=int(attrs.get("background_class", -1)),
            score_activation=bool(attrs.get("score_activation", 0)),
            box_coding=int(attrs.get("box_coding", 0)),
            class_agnostic=bool(attrs.get("class_agnostic", 0)), trace=trace)
    except ValueError as exc:
        raise UserError(f"EfficientNMS_TRT node {node.name!r}: {exc}") from None
    return [out.num_detections, out.detection_boxes, out.detection_scores,
            out.detection_classes], out


def run_batched_nms(node: Any, inputs: list[np.ndarray], trace: bool = False) -> PluginRun:
    """TRT::BatchedNMSDynamic_TRT / BatchedNMS_TRT: inputs boxes (B, N, 1, 4) (shared) or
    (B, N, C, 4), scores (B, N, C) → num_detections (B, 1) int32, nmsed_boxes (B, K, 4),
    nmsed_scores (B, K), nmsed_classes (B, K) float32."""
    from harness.nms import batched_nms_trt

    attrs = node_attributes(node)
    _required(node, attrs, BATCHED_NMS_REQUIRED)
    scores = inputs[1]
    num_classes = attrs.get("numClasses")
    if num_classes is not None and scores.ndim == 3 and int(num_classes) != scores.shape[2]:
        raise UserError(f"{node.op_type} node {node.name!r} says numClasses {num_classes} but "
                        f"its scores have {scores.shape[2]} classes")
    try:
        out = batched_nms_trt(
            inputs[0], scores, top_k=int(attrs["topK"]), keep_top_k=int(attrs["keepTopK"]),
            score_threshold=float(attrs["scoreThreshold"]),
            iou_threshold=float(attrs["iouThreshold"]),
            share_location=bool(attrs.get("shareLocation", 1)),
            background_label_id=int(attrs.get("backgroundLabelId", -1)),
            is_normalized=bool(attrs.get("isNormalized", 1)),
            clip_boxes=bool(attrs.get("clipBoxes", 1)),
            caffe_semantics=bool(attrs.get("caffeSemantics", 1)),
            score_bits=int(attrs.get("scoreBits", 16)), trace=trace)
    except ValueError as exc:
        raise UserError(f"{node.op_type} node {node.name!r}: {exc}") from None
    return [out.num_detections, out.nmsed_boxes, out.nmsed_scores, out.nmsed_classes], out


# mmdeploy's TRTBatchedNMS (csrc/mmdeploy/backend_ops/tensorrt/batched_nms, v1.3.1): a copy
# of TensorRT's BatchedNMS with snake-case attributes, dets (B, K, 5) = box + score and labels
# (B, K) outputs (invalid rows: zeros, label -1), IoU without the +1 px whatever
# is_normalized says (allClassNMS.cu: jaccardOverlap(..., offset 0)), topk clamped to the
# box count and at most 5120 (allClassNMS_gpu: (top_k + 511) / 512 <= 10)
MMDEPLOY_BATCHED_NMS_REQUIRED = ("num_classes", "topk", "keep_topk", "score_threshold",
                                 "iou_threshold")
MMDEPLOY_MAX_TOPK = 5120


def run_mmdeploy_batched_nms(node: Any, inputs: list[np.ndarray],
                             trace: bool = False) -> PluginRun:
    """mmdeploy::TRTBatchedNMS: inputs boxes (B, N, 1, 4) corners, scores (B, N, C) →
    dets (B, keep_topk, 5) float32, labels (B, keep_topk) int32."""
    from harness.nms import batched_nms_trt

    attrs = node_attributes(node)
    _required(node, attrs, MMDEPLOY_BATCHED_NMS_REQUIRED)
    boxes, scores = inputs[0], inputs[1]
    if int(attrs["num_classes"]) != scores.shape[2]:
        raise UserError(f"TRTBatchedNMS node {node.name!r} says num_classes "
                        f"{attrs['num_classes']} but its scores have {scores.shape[2]} classes")
    try:
        out = batched_nms_trt(
            boxes, scores, top_k=min(int(attrs["topk"]), scores.shape[1]),
            keep_top_k=int(attrs["keep_topk"]),
            score_threshold=float(attrs["score_threshold"]),
            iou_threshold=float(attrs["iou_threshold"]),
            share_location=boxes.ndim == 3 or boxes.shape[2] == 1,
            background_label_id=int(attrs.get("background_label_id", -1)),
            is_normalized=True,  # plain IoU: mmdeploy's kernel passes offset 0
            clip_boxes=bool(attrs.get("clip_boxes", 0)), caffe_semantics=False,
            max_top_k=MMDEPLOY_MAX_TOPK, trace=trace)
    except ValueError as exc:
        raise UserError(f"TRTBatchedNMS node {node.name!r}: {exc}") from None
    dets = np.concatenate([out.nmsed_boxes, out.nmsed_scores[..., None]], axis=-1)
    labels = out.nmsed_classes.astype(np.int32)
    dets[labels < 0] = 0.0
    return [dets.astype(np.float32), labels], out


# (domain, op_type) → the function computing the node: the one table of plugin ops
# (harness.export.plugins.PLUGIN_OPS is its key set)
def _roi_align_trt(node: Any, inputs: list[np.ndarray], trace: bool = False) -> PluginRun:
    from harness.kernels.roi_align_plugin import run_roi_align_trt

    return run_roi_align_trt(node, inputs, trace)


PLUGIN_KERNELS: dict[tuple[str, str], Callable[..., PluginRun]] = {
    ("TRT", "ROIAlign_TRT"): _roi_align_trt,  # a two-stage graph's RoIAlign as the plugin
    ("TRT", "EfficientNMS_TRT"): run_efficient_nms,
    ("TRT", "BatchedNMSDynamic_TRT"): run_batched_nms,
    ("TRT", "BatchedNMS_TRT"): run_batched_nms,
    ("mmdeploy", "TRTBatchedNMS"): run_mmdeploy_batched_nms,
}
