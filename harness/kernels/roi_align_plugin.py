"""TensorRT's RoIAlign plugin node (`TRT::ROIAlign_TRT`, version 1, libnvinfer_plugin;
plugin/roiAlignPlugin/README.md) computed on the CPU by the reference kernel
(harness.kernels.roi_align), so a graph that writes RoIAlign as that plugin runs through
onnxruntime with the numbers the plugin is specified to give: the ONNX RoiAlign's.

Inputs X (N, C, H, W), rois (R, 4) corners, batch_indices (R,) int32; output Y (R, C,
output_height, output_width). Attributes (all ints but spatial_scale):
coordinate_transformation_mode 1 = half-pixel (mmcv's aligned=True; default), 0 = output
half-pixel; mode 1 = average (default), 0 = max; output_height / output_width (default 1);
sampling_ratio 0 = adaptive (default); spatial_scale (default 1.0).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from harness.errors import UserError


def run_roi_align_trt(node: Any, inputs: list[np.ndarray], trace: bool = False
                      ) -> tuple[list[np.ndarray], Any]:
    """The plugin's one output for `inputs` (X, rois, batch_indices); no trace (RoIAlign
    decides no candidate's fate)."""
    from harness.kernels.roi_align import roi_align_onnx
    from harness.nms.plugin_nodes import node_attributes

    attrs = node_attributes(node)
    if len(inputs) != 3:
        raise UserError(f"ROIAlign_TRT node {node.name!r} has {len(inputs)} inputs; the "
                        "plugin takes X, rois and batch_indices")
    mode = int(attrs.get("mode", 1))
    transform = int(attrs.get("coordinate_transformation_mode", 1))
    if mode not in (0, 1) or transform not in (0, 1):
        raise UserError(f"ROIAlign_TRT node {node.name!r}: mode and "
                        "coordinate_transformation_mode are 0 or 1 (TensorRT refuses others)")
    x, rois, batch = inputs
    try:
        y = roi_align_onnx(
            x, rois, np.asarray(batch).astype(np.int64),
            output_height=int(attrs.get("output_height", 1)),
            output_width=int(attrs.get("output_width", 1)),
            sampling_ratio=int(attrs.get("sampling_ratio", 0)),
            spatial_scale=float(attrs.get("spatial_scale", 1.0)),
            mode="avg" if mode == 1 else "max",
            coordinate_transformation_mode="half_pixel" if transform == 1
            else "output_half_pixel")
    except ValueError as exc:
        raise UserError(f"ROIAlign_TRT node {node.name!r}: {exc}") from None
    return [y.astype(np.float32)], None
