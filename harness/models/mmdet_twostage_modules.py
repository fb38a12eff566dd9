"""The two-stage source's export module: the whole detector as one ONNX graph with the same
named outputs as `TwoStageModel.head_outputs` (RPN maps, padded proposals, `num_proposals`,
RoI head outputs), written as a deployment writes it:

- proposals in the graph: per FPN level a TopK of `nms_pre` over the objectness (mmdet sorts;
  the same set but for ties), the deltas decoded and clipped to each image's `img_shape` (a
  second graph input, (B, 2) float32 h, w: what mmdet clips to, not the padded input), boxes
  the clip flattened dropped by score (mmdet's `min_bbox_size` filter), one ONNX
  NonMaxSuppression with the level as the class (mmdet's per-level `batched_nms`), the best
  `max_per_img` of each image by a TopK, padded with zero rows;
- RoI features by ONNX RoiAlign (opset 16, `half_pixel` for mmcv's `aligned=True`), each RoI
  read from the FPN level mmdet's `map_roi_levels` gives it;
- the box head as it is.

Imports torch and mmcv: load it lazily (TwoStageModel.export_module).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from harness.export.nms_ops import OnnxNmsOp
from harness.export.variants import IMG_SHAPE_INPUT


# how the graph writes RoIAlign: ONNX RoiAlign opset 16 half_pixel (mmcv's aligned=True),
# the opset-10 form (no half-pixel offset), or TensorRT's ROIAlign_TRT plugin node
ROI_ALIGN_FORMS = ("half_pixel", "opset10", "plugin")


class RoiAlignOp(torch.autograd.Function):
    """mmcv's roi_align (avg) in torch; ONNX RoiAlign (opset >= 16) in the graph."""

    @staticmethod
    def forward(ctx: Any, feats: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor,
                out_h: int, out_w: int, spatial_scale: float, sampling_ratio: int,
                aligned: bool, form: str = "half_pixel") -> torch.Tensor:
        from mmcv.ops import roi_align

        rois = torch.cat([batch_index[:, None].to(boxes.dtype), boxes], dim=1)
        return roi_align(feats, rois, (out_h, out_w), spatial_scale, sampling_ratio, "avg",
                         aligned)

    @staticmethod
    def symbolic(g: Any, feats: Any, boxes: Any, batch_index: Any, out_h: int, out_w: int,
                 spatial_scale: float, sampling_ratio: int, aligned: bool,
                 form: str = "half_pixel") -> Any:
        if form == "plugin":  # TensorRT's ROIAlign_TRT (harness.kernels.roi_align_plugin)
            from harness.export.nms_ops import TRT_DOMAIN

            index = g.op("Cast", batch_index, to_i=6)  # the plugin takes int32 indices
            out = g.op(f"{TRT_DOMAIN}::ROIAlign_TRT", feats, boxes, index,
                       coordinate_transformation_mode_i=int(bool(aligned)), mode_i=1,
                       output_height_i=out_h, output_width_i=out_w,
                       sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale)
            channels = (feats.type().sizes() or [None, None])[1]
            out.setType(feats.type().with_sizes([None, channels, out_h, out_w]))
            return out
        # opset10: the op as opset 10 has it (no half-pixel offset) whatever `aligned`
        half = aligned and form != "opset10"
        return g.op("RoiAlign", feats, boxes, batch_index, output_height_i=out_h,
                    output_width_i=out_w, spatial_scale_f=spatial_scale,
                    sampling_ratio_i=sampling_ratio, mode_s="avg",
                    coordinate_transformation_mode_s="half_pixel" if half
                    else "output_half_pixel")


def delta_decode(anchors: torch.Tensor, deltas: torch.Tensor, means, stds,
                 wh_ratio_clip: float = 16 / 1000) -> torch.Tensor:
    """mmdet delta2bbox without the clip (the caller clips per image)."""
    import math

    d = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    pwh = anchors[..., 2:] - anchors[..., :2]
    max_ratio = abs(math.log(wh_ratio_clip))
    dwh = d[..., 2:].clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + pwh * d[..., :2]
    gwh = pwh * dwh.exp()
    return torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)


class TwoStageExportModule(nn.Module):
    """(images (B, 3, H, W), img_shape (B, 2)) → TwoStageModel.head_outputs' named outputs,
    every stage in the graph. H, W are fixed at export (the anchors are constants).

    The proposal settings are the source's (`source.rpn`: nms_pre, max_per_img, IoU, and the
    forms deployments use instead of mmdet's — `scope` "all": one NMS over every level;
    `topk_scope` "all": one TopK over every level). roi_align_form: "half_pixel" (opset 16,
    mmcv's aligned=True), "plugin" (TensorRT's ROIAlign_TRT node, the same numbers) or
    "opset10" (RoiAlign without the half-pixel offset, what an
    opset-10 export of an aligned model writes); sampling_ratio: a fixed count of sampling
    points written instead of the config's (mmdet: 0, adaptive), as some deployments do.
    The RoI features are the output of the scope `/roi_head/bbox_roi_extractor/`, the box
    head's nodes are under `/roi_head/bbox_head/`: the PyTorch module paths, so the layer diff
    maps both."""

    def __init__(self, source: Any, roi_align_form: str = "half_pixel",
                 sampling_ratio: Optional[int] = None, final_nms: Any = None):
        super().__init__()
        # end2end: the box head's multiclass NMS in the graph too (harness.export.variants.
        # End2EndNms, kind "onnx"), outputs `dets` (B, M, 5) and `labels` (B, M) after the
        # stage outputs
        self.final_nms = final_nms
        detector = source.module
        self.backbone = detector.backbone
        self.neck = detector.neck
        self.rpn_head = detector.rpn_head
        if roi_align_form not in ROI_ALIGN_FORMS:
            raise ValueError(f"roi_align_form {' | '.join(ROI_ALIGN_FORMS)}, not "
                             f"{roi_align_form}")
        self.roi_head = _RoiHead(detector.roi_head, roi_align_form, sampling_ratio)
        self._source = [source]

    @property
    def source(self) -> Any:
        return self._source[0]

    def extra_inputs(self, batch: int, h: int, w: int, device: Any) -> dict[str, torch.Tensor]:
        """The graph's inputs besides `images`, for tracing: each image's img_shape."""
        return {IMG_SHAPE_INPUT: torch.tensor([[h, w]] * batch, dtype=torch.float32,
                                              device=device)}

    def forward_named(self, images: torch.Tensor,
                      img_shape: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.neck(self.backbone(images))
        rpn_cls, rpn_reg = self.rpn_head(feats)
        out = {f"rpn_cls.{i}": t for i, t in enumerate(rpn_cls)}
        out.update({f"rpn_reg.{i}": t for i, t in enumerate(rpn_reg)})
        boxes, scores, count = self._proposals(rpn_cls, rpn_reg, img_shape)
        b, k = boxes.shape[:2]
        roi_cls, roi_reg = self._box_head(feats, boxes)
        out.update(proposals=torch.cat([boxes, scores[..., None]], dim=-1),
                   num_proposals=count,
                   roi_cls=roi_cls.reshape(b, k, -1), roi_reg=roi_reg.reshape(b, k, -1))
        if self.final_nms is not None:
            out["dets"], out["labels"] = self._final_nms(boxes, out["roi_cls"], out["roi_reg"],
                                                         count, img_shape)
        return out

    def _final_nms(self, rois, roi_cls, roi_reg, count, img_shape):
        """mmdet's multiclass NMS as one ONNX NonMaxSuppression: every (RoI, class) pair a
        box of its own (per-class regression, clipped to img_shape), the classes kept apart
        by mmcv batched_nms's offset (class * (max coordinate + 1)), then the best
        `keep_topk` by a TopK; rows past the detections are zeros with label -1. IoUs are
        those of network-input pixels (mmdet rescales to the original image first)."""
        nms = self.final_nms
        head = self.roi_head.bbox_head
        coder = head.bbox_coder
        b, k = rois.shape[0], int(rois.shape[1])  # K is fixed at export
        c = int(head.num_classes)
        scores = roi_cls.softmax(dim=-1)[..., :c]
        real = torch.arange(k, device=rois.device)[None] < count[:, None]
        scores = torch.where(real[..., None], scores, torch.full_like(scores, -1.0))
        deltas = roi_reg.reshape(b, k, -1, 4)
        boxes = delta_decode(rois[:, :, None, :].expand(-1, -1, deltas.shape[2], -1), deltas,
                             coder.means, coder.stds).expand(-1, -1, c, -1)
        h, w = img_shape[:, 0].reshape(b, 1, 1), img_shape[:, 1].reshape(b, 1, 1)
        zero = torch.zeros_like(boxes[..., 0])
        boxes = torch.stack([torch.min(torch.max(boxes[..., 0], zero), w),
                             torch.min(torch.max(boxes[..., 1], zero), h),
                             torch.min(torch.max(boxes[..., 2], zero), w),
                             torch.min(torch.max(boxes[..., 3], zero), h)], dim=-1)
        flat = boxes.reshape(b, k * c, 4)
        flat_scores = scores.reshape(b, k * c)
        label = torch.arange(c, device=rois.device).repeat(k)  # row-major (RoI, class)
        top = flat.amax(dim=(1, 2), keepdim=True) + 1
        shifted = flat + label[None, :, None].to(flat.dtype) * top
        selected = OnnxNmsOp.apply(shifted, flat_scores[:, None], k * c,
                                   float(nms.iou_threshold), float(nms.score_threshold))
        kept = torch.full_like(flat_scores, -1.0)
        kept[selected[:, 0], selected[:, 2]] = flat_scores[selected[:, 0], selected[:, 2]]
        best, index = kept.topk(min(int(nms.keep_topk), k * c), dim=1)
        found = best >= 0
        chosen = torch.gather(flat, 1, index[..., None].expand(-1, -1, 4))
        dets = torch.cat([chosen, best[..., None]], dim=-1)
        dets = torch.where(found[..., None], dets, torch.zeros_like(dets))
        labels = torch.where(found, index % c, torch.full_like(index, -1))
        return dets, labels

    def forward(self, images: torch.Tensor, img_shape: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward_named(images, img_shape).values())

    def _proposals(self, rpn_cls, rpn_reg, img_shape):
        src = self.source
        rpn = src.rpn
        head = self.rpn_head
        coder = head.bbox_coder
        b = rpn_cls[0].shape[0]
        sizes = [tuple(c.shape[2:]) for c in rpn_cls]
        anchors = head.prior_generator.grid_priors(sizes, dtype=torch.float32,
                                                   device=rpn_cls[0].device)
        flat = [(c.permute(0, 2, 3, 1).reshape(b, -1).sigmoid(),
                 r.permute(0, 2, 3, 1).reshape(b, -1, 4), a,
                 torch.full((a.shape[0],), level, dtype=torch.int64))
                for level, (c, r, a) in enumerate(zip(rpn_cls, rpn_reg, anchors))]
        if rpn.topk_scope == "all":  # one TopK over every level
            flat = [tuple(torch.cat(parts, dim=1 if i < 2 else 0)
                          for i, parts in enumerate(zip(*flat)))]
        all_boxes, all_scores, levels = [], [], []
        for s, d, a, lv in flat:
            n = s.shape[1]
            if 0 < rpn.nms_pre < n:
                s, index = s.topk(rpn.nms_pre, dim=1)
                d = torch.gather(d, 1, index[..., None].expand(-1, -1, 4))
                a, lv = a[index], lv[index]
            else:
                a, lv = a[None].expand(b, -1, -1), lv[None].expand(b, -1)
            all_boxes.append(delta_decode(a, d, coder.means, coder.stds))
            all_scores.append(s)
            levels.append(lv)
        boxes = torch.cat(all_boxes, dim=1)
        scores = torch.cat(all_scores, dim=1)
        level = torch.cat(levels, dim=1)  # (B, N): a TopK over all levels mixes them
        h, w = img_shape[:, 0:1], img_shape[:, 1:2]
        zero = torch.zeros_like(boxes[..., 0])
        x1 = torch.min(torch.max(boxes[..., 0], zero), w)
        y1 = torch.min(torch.max(boxes[..., 1], zero), h)
        x2 = torch.min(torch.max(boxes[..., 2], zero), w)
        y2 = torch.min(torch.max(boxes[..., 3], zero), h)
        boxes = torch.stack([x1, y1, x2, y2], dim=-1)
        if rpn.min_bbox_size >= 0:
            big = ((x2 - x1) > rpn.min_bbox_size) & ((y2 - y1) > rpn.min_bbox_size)
            scores = torch.where(big, scores, torch.full_like(scores, -1.0))
        # one NMS, the level as the class: (B, levels, N) scores, -1 off the box's level;
        # scope "all": the levels as one class
        if rpn.scope == "all":
            per_level = scores[:, None]
        else:
            per_level = torch.stack([torch.where(level == i, scores,
                                                 torch.full_like(scores, -1.0))
                                     for i in range(len(rpn_cls))], dim=1)
        selected = OnnxNmsOp.apply(boxes, per_level, int(rpn.max_per_img),
                                   float(rpn.iou_threshold), 0.0)
        kept = torch.full_like(scores, -1.0)
        kept[selected[:, 0], selected[:, 2]] = scores[selected[:, 0], selected[:, 2]]
        k = min(int(rpn.max_per_img), int(scores.shape[1]))
        best, index = kept.topk(k, dim=1)
        real = best >= 0
        boxes = torch.gather(boxes, 1, index[..., None].expand(-1, -1, 4))
        boxes = torch.where(real[..., None], boxes, torch.zeros_like(boxes))
        best = torch.where(real, best, torch.zeros_like(best))
        return boxes, best, real.sum(dim=1)

    def _box_head(self, feats, boxes):
        b, k = boxes.shape[:2]
        flat = boxes.reshape(-1, 4)
        batch_index = torch.arange(b, device=boxes.device).repeat_interleave(k)
        return self.roi_head(feats, flat, batch_index)


class _RoiHead(nn.Module):
    """The detector's RoI head as the graph writes it: its box head as it is, its extractor
    as ONNX RoiAlign nodes (same module paths as in PyTorch)."""

    def __init__(self, roi_head: nn.Module, form: str, sampling_ratio: Optional[int]):
        super().__init__()
        self.bbox_roi_extractor = _RoiExtractor(roi_head.bbox_roi_extractor, form,
                                                sampling_ratio)
        self.bbox_head = roi_head.bbox_head

    def forward(self, feats, flat, batch_index):
        return self.bbox_head(self.bbox_roi_extractor(feats, flat, batch_index))


class _RoiExtractor(nn.Module):
    """mmdet's SingleRoIExtractor: each RoI read by RoiAlign from the level map_roi_levels
    gives it (scale = sqrt(w h), floor(log2(scale / finest_scale + 1e-6)), clamped)."""

    def __init__(self, extractor: nn.Module, form: str, sampling_ratio: Optional[int]):
        super().__init__()
        self._extractor = [extractor]  # not registered: its mmcv ops are not exported
        self.form = form
        self.sampling_ratio = sampling_ratio

    def forward(self, feats, flat, batch_index):
        extractor = self._extractor[0]
        scale = torch.sqrt((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1]))
        levels = torch.floor(torch.log2(scale / extractor.finest_scale + 1e-6))
        levels = levels.clamp(min=0, max=extractor.num_inputs - 1)
        out = None
        for i, layer in enumerate(extractor.roi_layers):
            ratio = layer.sampling_ratio if self.sampling_ratio is None else self.sampling_ratio
            part = RoiAlignOp.apply(feats[i], flat, batch_index, int(layer.output_size[0]),
                                    int(layer.output_size[1]), float(layer.spatial_scale),
                                    int(ratio), bool(layer.aligned), self.form)
            mask = (levels == i)[:, None, None, None]
            out = torch.where(mask, part, torch.zeros_like(part)) if out is None \
                else torch.where(mask, part, out)
        return out


class RpnPartModule(nn.Module):
    """The first graph of a split deployment: images → the FPN levels the RoI head reads
    (`feats.l`) and the RPN maps (`rpn_cls.l`, `rpn_reg.l`); proposal selection and RoIAlign
    run outside it (harness.backends.split_twostage)."""

    def __init__(self, source: Any):
        super().__init__()
        detector = source.module
        self.backbone = detector.backbone
        self.neck = detector.neck
        self.rpn_head = detector.rpn_head
        self._levels = int(detector.roi_head.bbox_roi_extractor.num_inputs)

    def forward_named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.neck(self.backbone(images))
        rpn_cls, rpn_reg = self.rpn_head(feats)
        out = {f"feats.{i}": f for i, f in enumerate(feats[:self._levels])}
        out.update({f"rpn_cls.{i}": t for i, t in enumerate(rpn_cls)})
        out.update({f"rpn_reg.{i}": t for i, t in enumerate(rpn_reg)})
        return out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward_named(images).values())


class HeadPartModule(nn.Module):
    """The second graph of a split deployment: RoI features (R, C, h, w), read by RoIAlign
    outside, → the box head's `roi_cls` (R, classes + 1) and `roi_reg` (R, 4 classes)."""

    def __init__(self, source: Any):
        super().__init__()
        self.roi_head = _BoxHeadOnly(source.module.roi_head.bbox_head)

    def forward_named(self, roi_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, reg = self.roi_head(roi_feats)
        return {"roi_cls": cls, "roi_reg": reg}

    def forward(self, roi_feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.forward_named(roi_feats).values())


class _BoxHeadOnly(nn.Module):
    """`roi_head` with only its box head, so the head graph's scopes are the PyTorch paths
    (`/roi_head/bbox_head/...`)."""

    def __init__(self, bbox_head: nn.Module):
        super().__init__()
        self.bbox_head = bbox_head

    def forward(self, roi_feats):
        return self.bbox_head(roi_feats)
