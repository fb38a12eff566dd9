"""The fixture detector exported the way mmyolo's easydeploy exports it: real-convention
foreign ONNX files for the harness to recognise.

easydeploy (mmyolo's projects/easydeploy) is in neither the mmyolo 0.6.0 wheel nor its sdist,
so this module rebuilds what it does, following its source at mmyolo v0.6.0 (commit 8c4d9dc5:
model/model.py DeployModel, bbox_code/bbox_coder.py yolov5_bbox_decoder, nms/ort_nms.py,
nms/trt_nms.py, tools/export_onnx.py), for a YOLOv5 head with post-processing. Node scopes
come out as easydeploy's (`/baseModel/backbone/...`) because the wrapper holds the detector
under the same attribute name. What the files hold: tests/foreign/README.md.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.export.nms_ops import (
    BatchedNmsAttributes, BatchedNmsDynamicOp, EfficientNmsAttributes, EfficientNmsOp,
)
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

from tests.foreign.torchscript_export import torchscript_onnx_export

EASYDEPLOY_VERSION = "mmyolo v0.6.0 (8c4d9dc5) projects/easydeploy"
EASYDEPLOY_BACKENDS = ("onnxruntime", "tensorrt8", "tensorrt7")
FIXTURE_SIZE = (320, 320)  # (height, width), export_onnx.py's --img-size
OPSET = 11  # export_onnx.py's --opset default
INPUT_NAME = "images"
OUTPUT_NAMES = ["num_dets", "boxes", "scores", "labels"]

# [xc, yc, w, h] @ XYWH_TO_XYXY = [x1, y1, x2, y2]: easydeploy converts centre-size boxes with
# one MatMul by this constant (nms/ort_nms.py, nms/trt_nms.py)
XYWH_TO_XYXY = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0],
                             [-0.5, 0.0, 0.5, 0.0], [0.0, -0.5, 0.0, 0.5]])
# TensorRT's BatchedNMS plugin takes at most this topK; easydeploy caps pre_top_k to it
BATCHED_NMS_MAX_TOPK = 4096


@dataclass(frozen=True)
class EasyDeployPostprocess:
    """export_onnx.py's --pre-topk, --keep-topk, --iou-threshold, --score-threshold defaults."""

    pre_top_k: int = 1000
    keep_top_k: int = 100
    iou_threshold: float = 0.65
    score_threshold: float = 0.25


class _OnnxNms(torch.autograd.Function):
    """onnx::NonMaxSuppression as easydeploy writes it: the three limits are traced constant
    tensors and the node carries no attribute (center_point_box left at its default 0).
    harness.export.nms_ops.OnnxNmsOp writes center_point_box=0 explicitly, so it is not used
    here: the file is to look like easydeploy's."""

    @staticmethod
    def forward(ctx: Any, boxes: torch.Tensor, scores: torch.Tensor,
                max_output_boxes_per_class: torch.Tensor, iou_threshold: torch.Tensor,
                score_threshold: torch.Tensor) -> torch.Tensor:
        # a placeholder for the dry run and the trace: box 0 of class 0 in every image
        batch = torch.arange(scores.shape[0], dtype=torch.int64)
        zeros = torch.zeros_like(batch)
        return torch.stack([batch, zeros, zeros], 1)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_output_boxes_per_class: Any,
                 iou_threshold: Any, score_threshold: Any) -> Any:
        return g.op("NonMaxSuppression", boxes, scores, max_output_boxes_per_class,
                    iou_threshold, score_threshold, outputs=1)


def _yolov5_xywh(priors: torch.Tensor, bbox_preds: torch.Tensor,
                 stride: torch.Tensor) -> torch.Tensor:
    """easydeploy's YOLOv5 decoder: priors (1, N, 4) xyxy anchors, bbox_preds (B, N, 4)
    logits, stride (N,) → boxes (B, N, 4) [xc, yc, w, h] in input pixels."""
    bbox_preds = bbox_preds.sigmoid()
    x_center = (priors[..., 0] + priors[..., 2]) * 0.5
    y_center = (priors[..., 1] + priors[..., 3]) * 0.5
    w = priors[..., 2] - priors[..., 0]
    h = priors[..., 3] - priors[..., 1]
    x_pred = (bbox_preds[..., 0] - 0.5) * 2 * stride + x_center
    y_pred = (bbox_preds[..., 1] - 0.5) * 2 * stride + y_center
    w_pred = (bbox_preds[..., 2] * 2) ** 2 * w
    h_pred = (bbox_preds[..., 3] * 2) ** 2 * h
    return torch.stack([x_pred, y_pred, w_pred, h_pred], dim=-1)


def _onnx_nms_outputs(scores: torch.Tensor, boxes: torch.Tensor, selected: torch.Tensor,
                      batch_size: int) -> tuple[torch.Tensor, ...]:
    """easydeploy's select_nms_index: NonMaxSuppression's rows (M, 3) → every selected
    detection of each image sorted by score, padded with zero rows of label -1 up to M + 1
    rows; num_dets counts scores > 0. keep_top_k is not applied here (easydeploy passes it
    and never uses it)."""
    batch_inds, cls_inds, box_inds = selected[:, 0], selected[:, 1], selected[:, 2]
    picked = torch.cat([boxes[batch_inds, box_inds, ...],
                        scores[batch_inds, cls_inds, box_inds].unsqueeze(1)], dim=1)
    images = torch.arange(0, batch_size, dtype=batch_inds.dtype)
    mine = batch_inds == images.unsqueeze(1)  # (B, M): row m belongs to image b
    dets = picked.unsqueeze(0).repeat(batch_size, 1, 1).where(mine.unsqueeze(-1),
                                                               picked.new_zeros(1))
    labels = cls_inds.unsqueeze(0).repeat(batch_size, 1).where(mine, cls_inds.new_ones(1) * -1)
    n = dets.shape[0]
    dets = torch.cat((dets, dets.new_zeros((n, 1, 5))), 1)
    labels = torch.cat((labels, -labels.new_ones((n, 1))), 1)
    _, order = dets[:, :, -1].sort(dim=1, descending=True)
    rows = torch.arange(batch_size, dtype=order.dtype).view(-1, 1)
    dets, labels = dets[rows, order, ...], labels[rows, order, ...]
    det_boxes, det_scores = dets.split([4, 1], 2)
    det_scores = det_scores.squeeze(-1)
    num_dets = (det_scores > 0).sum(1, keepdim=True)
    return num_dets, det_boxes, det_scores, labels.to(torch.int32)


class EasyDeployModel(torch.nn.Module):
    """easydeploy's DeployModel with a postprocess config, for a YOLOv5 head.

    `baseModel` is the mmyolo detector (its forward in 'tensor' mode gives the head's
    cls_scores, bbox_preds, objectnesses); `baseHead` is its head, registered a second time
    as easydeploy does. Outputs num_dets (B, 1), boxes (B, K, 4) xyxy, scores (B, K),
    labels (B, K) int32.
    """

    def __init__(self, detector: torch.nn.Module, backend: str,
                 postprocess: EasyDeployPostprocess) -> None:
        super().__init__()
        if backend not in EASYDEPLOY_BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {', '.join(EASYDEPLOY_BACKENDS)}")
        if type(detector.bbox_head).__name__ != "YOLOv5Head":
            raise ValueError("only a YOLOv5 head is rebuilt (box_coding 1, xywh decoder)")
        self.baseModel = detector
        self.baseHead = detector.bbox_head
        self.backend = backend
        self.postprocess = postprocess

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls_scores, bbox_preds, objectnesses = self.baseModel(inputs)
        head = self.baseHead
        num_imgs = cls_scores[0].shape[0]
        featmap_sizes = [cls_score.shape[2:] for cls_score in cls_scores]
        priors = torch.cat(head.prior_generator.grid_priors(
            featmap_sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device))
        strides = torch.cat([
            priors.new_full((size[0] * size[1] * head.num_base_priors,), stride)
            for size, stride in zip(featmap_sizes, head.featmap_strides)])
        scores = torch.cat([s.permute(0, 2, 3, 1).reshape(num_imgs, -1, head.num_classes)
                            for s in cls_scores], dim=1).sigmoid()
        deltas = torch.cat([b.permute(0, 2, 3, 1).reshape(num_imgs, -1, 4)
                            for b in bbox_preds], dim=1)
        objectness = torch.cat([o.permute(0, 2, 3, 1).reshape(num_imgs, -1)
                                for o in objectnesses], dim=1).sigmoid()
        scores = scores * objectness.unsqueeze(-1)
        boxes = _yolov5_xywh(priors[None], deltas, strides)
        return getattr(self, f"_nms_{self.backend}")(boxes, scores)

    def _nms_onnxruntime(self, boxes: torch.Tensor, scores: torch.Tensor):
        # ort_nms.onnx_nms: max_output_boxes_per_class is keep_top_k; pre_top_k unused
        post = self.postprocess
        boxes = boxes @ XYWH_TO_XYXY
        scores = scores.transpose(1, 2).contiguous()
        selected = _OnnxNms.apply(boxes, scores, torch.tensor([post.keep_top_k]),
                                  torch.tensor([post.iou_threshold]),
                                  torch.tensor([post.score_threshold]))
        return _onnx_nms_outputs(scores, boxes, selected, scores.shape[0])

    def _nms_tensorrt8(self, boxes: torch.Tensor, scores: torch.Tensor):
        # trt_nms._efficient_nms: centre-size boxes straight in, box_coding 1
        post = self.postprocess
        attrs = EfficientNmsAttributes(
            score_threshold=post.score_threshold, iou_threshold=post.iou_threshold,
            max_output_boxes=post.keep_top_k, background_class=-1, box_coding=1,
            score_activation=0)
        return EfficientNmsOp.apply(boxes, scores, attrs)

    def _nms_tensorrt7(self, boxes: torch.Tensor, scores: torch.Tensor):
        # trt_nms._batched_nms: xyxy boxes (B, N, 1, 4), topK = min(pre_top_k, 4096)
        post = self.postprocess
        boxes = (boxes @ XYWH_TO_XYXY).unsqueeze(2)
        attrs = BatchedNmsAttributes(
            num_classes=int(scores.shape[2]),
            top_k=min(post.pre_top_k, BATCHED_NMS_MAX_TOPK), keep_top_k=post.keep_top_k,
            score_threshold=post.score_threshold, iou_threshold=post.iou_threshold,
            share_location=1, background_label_id=-1, is_normalized=0, clip_boxes=0,
            score_bits=16, caffe_semantics=1)
        num_dets, det_boxes, det_scores, det_classes = BatchedNmsDynamicOp.apply(
            boxes, scores, attrs)
        return num_dets, det_boxes, det_scores, det_classes.int()


def export_with_easydeploy(backend: str, out_path: Path,
                           postprocess: EasyDeployPostprocess = EasyDeployPostprocess(),
                           batch_size: int = 1) -> float:
    """Export the fixture as easydeploy's tools/export_onnx.py does (model built by
    mmdet.apis.init_detector, a dry run, torch.onnx.export of a random static input at
    opset 11, onnx.checker, the TensorRT outputs' dims rewritten as dim_param strings);
    seconds taken."""
    import onnx
    from mmdet.apis import init_detector

    start = time.perf_counter()
    detector = init_detector(str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), device="cpu")
    detector.eval()
    model = EasyDeployModel(detector, backend, postprocess).eval()
    fake_input = torch.randn(batch_size, 3, *FIXTURE_SIZE)
    with torch.no_grad():
        model(fake_input)  # export_onnx.py's dry run
    with io.BytesIO() as f, torchscript_onnx_export():
        torch.onnx.export(model, fake_input, f, input_names=[INPUT_NAME],
                          output_names=OUTPUT_NAMES, opset_version=OPSET)
        f.seek(0)
        onnx_model = onnx.load(f)
    onnx.checker.check_model(onnx_model)
    if backend.startswith("tensorrt"):
        # export_onnx.py: "Fix tensorrt onnx output shape, just for view"
        keep = postprocess.keep_top_k
        shapes = [batch_size, 1, batch_size, keep, 4, batch_size, keep, batch_size, keep]
        for output in onnx_model.graph.output:
            for dim in output.type.tensor_type.shape.dim:
                dim.dim_param = str(shapes.pop(0))
    onnx.save(onnx_model, str(out_path))
    return time.perf_counter() - start
