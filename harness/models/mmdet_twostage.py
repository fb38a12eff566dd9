"""The mmdet two-stage model source: a Faster R-CNN-style detector (an RPN, an RoI head with a
`StandardRoIHead` and one box head; Mask R-CNN's box branch too) as a ModelSource
(harness.models.source), stage by stage:

    images → backbone + neck → RPN maps (`rpn_cls.l`, `rpn_reg.l`, per FPN level)
           → proposals (per-level TopK, per-level NMS, cap: the RPN's test_cfg)
           → RoI features (RoIAlign on the FPN level each proposal maps to)
           → box head (`roi_cls` (B, K, C + 1) logits, `roi_reg` (B, K, 4 C) deltas)
           → per-class boxes decoded from the proposals, rescaled, multiclass NMS

Proposals are padded to a fixed count per image (the RPN's max_per_img) with
`num_proposals` saying how many rows are real, as exported files pad them; padding never
becomes a proposal or a detection. The numpy references are harness/nms/rpn.py (proposals)
and harness/nms/rcnn.py (the final NMS); `framework_detections` is mmdet's own code.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from harness.errors import UserError
from harness.models.checkpoint import build_detector
from harness.models.pipeline import PreprocessSpec, preprocess_spec_from_config
from harness.models.source import (
    DecodedCandidates, NmsSettings, framework_results, nms_changes,
)

# mmdet detector type → the family name users know (the box branch is what is compared)
TWO_STAGE = {"FasterRCNN": "faster_rcnn", "MaskRCNN": "mask_rcnn"}
RPN_KINDS = ("rpn_cls", "rpn_reg")
STAGE_OUTPUTS = ("proposals", "num_proposals", "roi_cls", "roi_reg")


def is_two_stage(model_cfg: Any) -> bool:
    """Whether an mmengine model config is a two-stage detector (an RPN and an RoI head)."""
    return isinstance(model_cfg, dict) and "rpn_head" in model_cfg and "roi_head" in model_cfg


def check_two_stage_config(cfg: Any, path: Union[str, Path]) -> None:
    """One line for a two-stage config the source does not cover."""
    model = cfg.get("model")
    kind = str(model.get("type", "")).split(".")[-1]
    if kind not in TWO_STAGE:
        raise UserError(f"config {path} is a {kind or '?'} two-stage detector; harness "
                        f"supports {', '.join(TWO_STAGE)}")
    roi = model["roi_head"]
    if str(roi.get("type", "")).split(".")[-1] != "StandardRoIHead":
        raise UserError(f"config {path}: roi_head {roi.get('type')} is not supported (only "
                        "StandardRoIHead, one box head)")


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


class TwoStageModel:
    """One mmdet two-stage detector as a ModelSource. `nms` is the box head's test_cfg
    (`rcnn`; nms_pre is the RPN's per-level TopK, the two-stage detector's only one);
    `rpn` the proposal settings (harness.nms.rpn.RpnSettings)."""

    framework = "mmdet"

    def __init__(self, cfg: Any, module: Any, cfg_path: str, ckpt_path: Optional[str],
                 class_names: tuple[str, ...], device: str):
        from harness.nms.rpn import RpnSettings

        self.cfg = cfg
        self.module = module
        self.cfg_path = cfg_path
        self.ckpt_path = ckpt_path
        self.device = device
        roi_head = module.roi_head
        self.bbox_head = roi_head.bbox_head
        self.family = TWO_STAGE.get(type(module).__name__, type(module).__name__)
        self.head_type = f"{type(roi_head).__name__}/{type(self.bbox_head).__name__}"
        self.num_classes = int(self.bbox_head.num_classes)
        self.class_names = class_names
        self.preprocess: PreprocessSpec = preprocess_spec_from_config(cfg)
        self.rpn_test_cfg = module.rpn_head.test_cfg
        self.rcnn_test_cfg = roi_head.test_cfg
        self.rpn = RpnSettings.from_test_cfg(self.rpn_test_cfg)
        rcnn = self.rcnn_test_cfg
        self.nms = NmsSettings(
            score_thr=float(rcnn.get("score_thr", 0.0)), nms_pre=self.rpn.nms_pre,
            iou_threshold=float((rcnn.get("nms") or {}).get("iou_threshold", 0.5)),
            max_per_img=int(rcnn.get("max_per_img", 100)), multi_label=True, yolox_style=False)
        self.nms_config = self.nms
        # how the export writes what mmdet does its own way (TwoStageExportModule's options,
        # e.g. roi_align_form="opset10"): the forms deployments use, for planted cases
        self.export_options: dict[str, Any] = {}

    # -- copies ----------------------------------------------------------------------------

    def with_nms(self, **changes: Any) -> "TwoStageModel":
        """score_thr, iou_threshold, max_per_img change the box head's test_cfg; nms_pre the
        RPN's per-level TopK."""
        import copy
        import dataclasses

        changes = nms_changes(changes)
        if not changes:
            return self
        other = copy.copy(self)
        other.nms = dataclasses.replace(self.nms, **changes)
        rcnn = copy.deepcopy(self.rcnn_test_cfg)
        for key in ("score_thr", "max_per_img"):
            if key in changes:
                rcnn[key] = changes[key]
        if "iou_threshold" in changes:
            rcnn["nms"] = {**dict(rcnn.get("nms") or {"type": "nms"}),
                           "iou_threshold": changes["iou_threshold"]}
        other.rcnn_test_cfg = rcnn
        if "nms_pre" in changes:
            rpn = copy.deepcopy(self.rpn_test_cfg)
            rpn["nms_pre"] = changes["nms_pre"]
            other.rpn_test_cfg = rpn
            other.rpn = dataclasses.replace(self.rpn, nms_pre=int(changes["nms_pre"]))
        return other

    def copy_to(self, device: str, dtype: Any) -> "TwoStageModel":
        import copy

        other = copy.copy(self)
        other.module = copy.deepcopy(self.module).to(device=device, dtype=dtype)
        other.bbox_head = other.module.roi_head.bbox_head
        other.device = device
        return other

    # -- the stages, torch side ------------------------------------------------------------

    def _img_metas(self, metas: Optional[Sequence[Any]], batch: int, hw: Sequence[int]):
        """mmdet's img metas from the harness's ImageMeta; without metas, every image is the
        whole network input (what a file with no image-shape input clips to)."""
        if metas is None:
            return [{"img_shape": tuple(hw), "ori_shape": tuple(hw), "scale_factor": (1.0, 1.0)}
                    for _ in range(batch)]
        return [{"img_shape": tuple(m.img_shape), "ori_shape": tuple(m.ori_shape),
                 "scale_factor": tuple(m.scale_factor)} for m in metas]

    def head_outputs(self, images: Any, metas: Optional[Sequence[Any]] = None) -> dict[str, Any]:
        """images (B, 3, H, W) → the named outputs of every stage, as torch tensors:
        `rpn_cls.l` (B, A, H_l, W_l), `rpn_reg.l` (B, 4 A, H_l, W_l), `proposals` (B, K, 5)
        [x1, y1, x2, y2, score] in input pixels (mmdet's RPN; rows past `num_proposals` (B,)
        are zeros), `roi_cls` (B, K, C + 1), `roi_reg` (B, K, 4 C)."""
        import torch

        from mmdet.structures.bbox import bbox2roi

        m = self.module
        x = torch.as_tensor(images, device=self.device)
        b = x.shape[0]
        img_metas = self._img_metas(metas, b, x.shape[2:])
        with torch.no_grad():
            feats = m.extract_feat(x)
            rpn_cls, rpn_reg = m.rpn_head(feats)
            # the proposal NMS in float32 (mmcv's CPU kernel takes nothing else; deployments
            # run it in fp32 too)
            found = m.rpn_head.predict_by_feat(
                [c.float() for c in rpn_cls], [r.float() for r in rpn_reg],
                batch_img_metas=img_metas, cfg=self.rpn_test_cfg, rescale=False)
            k = int(self.rpn.max_per_img)
            proposals = x.new_zeros((b, k, 5), dtype=torch.float32)
            counts = torch.zeros(b, dtype=torch.int64)
            for i, inst in enumerate(found):
                n = min(len(inst.bboxes), k)
                proposals[i, :n, :4] = inst.bboxes[:n]
                proposals[i, :n, 4] = inst.scores[:n]
                counts[i] = n
            # every row, padding too (zero boxes), as the exported graph computes them: the
            # RoI features and box head layers then have the file's (B * K, ...) shapes
            cls, reg = self.roi_forward(feats, [proposals[i, :, :4] for i in range(b)],
                                        bbox2roi)
        out = {f"{kind}.{level}": t for kind, maps in zip(RPN_KINDS, (rpn_cls, rpn_reg))
               for level, t in enumerate(maps)}
        roi_cls, roi_reg = cls.reshape(b, k, -1), reg.reshape(b, k, -1)
        out.update(proposals=proposals, num_proposals=counts, roi_cls=roi_cls, roi_reg=roi_reg)
        return out

    def roi_forward(self, feats: Sequence[Any], boxes: Sequence[Any], bbox2roi: Any):
        """The RoI head on per-image proposal boxes: (cls logits, box deltas) for all RoIs
        in image order (StandardRoIHead._bbox_forward)."""
        head = self.module.roi_head
        rois = bbox2roi(list(boxes))
        levels = feats[:head.bbox_roi_extractor.num_inputs]
        dtype = levels[0].dtype
        if levels[0].device.type == "cpu" and dtype != rois.dtype:
            # mmcv's CPU RoIAlign takes float32 only: pool in float32, go on in the module's
            # dtype
            roi_feats = head.bbox_roi_extractor([f.float() for f in levels], rois).to(dtype)
        else:
            roi_feats = head.bbox_roi_extractor(levels, rois.to(dtype))
        if head.with_shared_head:
            roi_feats = head.shared_head(roi_feats)
        return head.bbox_head(roi_feats)

    def decoded_outputs(self, head: Mapping[str, Any]) -> dict[str, Any]:
        raise UserError("a two-stage detector has no `decoded` variant yet: its candidates "
                        "are per proposal and class (use the raw outputs)")

    def export_module(self, variant: str, nms: Any = None) -> Any:
        """`raw`: the whole detector in one graph with the same outputs as head_outputs
        (harness.models.mmdet_twostage_modules), inputs `images` and `img_shape`;
        `end2end`: the same plus the box head's NMS (`nms`, an End2EndNms of kind "onnx"),
        outputs `dets` and `labels` after the stage outputs."""
        from harness.models.mmdet_twostage_modules import TwoStageExportModule

        if variant == "end2end":
            if nms is None or nms.kind != "onnx" or nms.pre_topk is not None:
                raise UserError("a two-stage detector exports --variant end2end with --nms "
                                "onnx (its box-head NMS as ONNX NonMaxSuppression), without "
                                "--pre-topk (its one TopK is the RPN's nms_pre)")
            return TwoStageExportModule(self, final_nms=nms, **self.export_options)
        if variant != "raw":
            raise UserError(f"a two-stage detector exports --variant raw (every stage, the "
                            f"proposal NMS in the graph) or end2end, not {variant}")
        return TwoStageExportModule(self, **self.export_options)

    def output_variant(self, names: Sequence[str]) -> Optional[str]:
        """"end2end" for the stage outputs with the box head's NMS outputs, "raw" for the
        stage outputs (proposals, RoI head outputs), else None."""
        if not set(STAGE_OUTPUTS) <= set(names):
            return None
        return "end2end" if {"dets", "labels"} <= set(names) else "raw"

    # -- numpy side --------------------------------------------------------------------------

    def decode(self, outputs: Mapping[str, Any],
               metas: Optional[Sequence[Any]] = None) -> DecodedCandidates:
        """Per RoI and class: boxes (B, K, C, 4) decoded from the outputs' own proposals with
        the box coder's means / stds and clipped to each image's img_shape (network-input
        pixels), scores (B, K, C) softmax without the background column; `counts` (B,) the
        real rows."""
        from harness.nms.rcnn import softmax
        from harness.nms.rpn import delta_xywh_decode

        missing = [n for n in STAGE_OUTPUTS if n not in outputs]
        if missing:
            raise UserError(f"outputs {', '.join(sorted(outputs))} lack the two-stage "
                            f"outputs {', '.join(missing)}")
        props = _numpy(outputs["proposals"]).astype(np.float32)
        counts = _numpy(outputs["num_proposals"]).astype(np.int64).reshape(-1)
        logits = _numpy(outputs["roi_cls"]).astype(np.float32)
        deltas = _numpy(outputs["roi_reg"]).astype(np.float32)
        b, k = props.shape[:2]
        c = self.num_classes
        coder = self.bbox_head.bbox_coder
        boxes = np.zeros((b, k, c, 4), np.float32)
        for i in range(b):
            hw = None if metas is None else tuple(metas[i].img_shape)
            n = int(counts[i])
            # per-class deltas (n, 4 C) each against its RoI; class-agnostic (n, 4) shared
            decoded = delta_xywh_decode(props[i, :n, :4], deltas[i, :n], coder.means,
                                        coder.stds, max_shape=hw,
                                        clip_border=coder.clip_border).reshape(n, -1, 4)
            boxes[i, :n] = np.broadcast_to(decoded, (n, c, 4))
        scores = softmax(logits)[..., :c]
        return DecodedCandidates(boxes=boxes, scores=scores, objectness=None, counts=counts)

    def detections(self, decoded: DecodedCandidates, metas: Sequence[Any],
                   trace: bool = False, nms_pixels: str = "original") -> list[Any]:
        """mmdet's multiclass NMS per image (harness.nms.rcnn) on boxes rescaled to the
        original image; box_index is the proposal row. nms_pixels "input": IoUs measured on
        network-input pixels, as a graph with the NMS inside does (the kept boxes are then
        rescaled)."""
        from harness.nms.rcnn import rcnn_nms, rescale_to_original

        out = []
        for i, meta in enumerate(metas):
            n = int(decoded.counts[i]) if decoded.counts is not None else decoded.boxes.shape[1]
            boxes = decoded.boxes[i, :n] if nms_pixels == "input" else \
                rescale_to_original(decoded.boxes[i, :n], meta.scale_factor)
            res = rcnn_nms(boxes, decoded.scores[i, :n], score_thr=self.nms.score_thr,
                           iou_threshold=self.nms.iou_threshold,
                           max_per_img=self.nms.max_per_img, trace=trace)
            if nms_pixels == "input":
                res.boxes = rescale_to_original(res.boxes, meta.scale_factor)
            out.append(res)
        return out

    def proposals(self, outputs: Mapping[str, Any],
                  metas: Sequence[Any]) -> Optional[list[np.ndarray]]:
        """The outputs' own proposals per image, (K, 5) [x1, y1, x2, y2, score], padding
        dropped."""
        props = _numpy(outputs["proposals"]).astype(np.float32)
        counts = _numpy(outputs["num_proposals"]).astype(np.int64).reshape(-1)
        return [props[i, :int(counts[i])] for i in range(props.shape[0])]

    def reference_proposals(self, outputs: Mapping[str, Any], metas: Sequence[Any],
                            trace: bool = False, settings: Any = None,
                            maps: Any = None) -> list[Any]:
        """The numpy replay of the RPN (harness.nms.rpn) on the outputs' RPN maps, per
        image, with every anchor's fate when `trace`; `settings` (RpnSettings) replaces the
        source's own (a file exported with other proposal settings); maps: rpn_maps(outputs)
        when the caller has them already."""
        from harness.nms.rpn import rpn_proposals

        coder = self.module.rpn_head.bbox_coder
        logits, deltas, anchors = maps or self.rpn_maps(outputs)
        return [rpn_proposals(lg, dl, anchors, tuple(meta.img_shape), settings or self.rpn,
                              coder.means, coder.stds, trace=trace)
                for lg, dl, meta in zip(logits, deltas, metas)]

    def rpn_boxes(self, outputs: Mapping[str, Any], metas: Sequence[Any],
                  maps: Any = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image, every anchor decoded and clipped to img_shape as the RPN does, (N, 4),
        with its objectness (N,), in the order of the RPN trace: what a proposal is linked
        to its anchor by."""
        from harness.nms.rpn import delta_xywh_decode, sigmoid_f32

        coder = self.module.rpn_head.bbox_coder
        logits, deltas, anchors = maps or self.rpn_maps(outputs)
        flat_anchors = np.concatenate(anchors)
        return [(delta_xywh_decode(flat_anchors, np.concatenate(dl), coder.means, coder.stds,
                                   max_shape=tuple(meta.img_shape)),
                 sigmoid_f32(np.concatenate(lg)))
                for lg, dl, meta in zip(logits, deltas, metas)]

    def rpn_maps(self, outputs: Mapping[str, Any]):
        """(per image the per-level flattened logits, the same of the deltas, the per-level
        anchors): what reference_proposals and rpn_boxes read."""
        import torch

        from harness.nms.rpn import flatten_rpn_level

        levels = len([n for n in outputs if n.startswith("rpn_cls.")])
        cls = [_numpy(outputs[f"rpn_cls.{level}"]) for level in range(levels)]
        reg = [_numpy(outputs[f"rpn_reg.{level}"]) for level in range(levels)]
        gen = self.module.rpn_head.prior_generator
        anchors = [a.cpu().numpy() for a in gen.grid_priors(
            [c.shape[2:] for c in cls], dtype=torch.float32, device="cpu")]
        logits, deltas = [], []
        for i in range(cls[0].shape[0]):
            flat = [flatten_rpn_level(c[i], r[i]) for c, r in zip(cls, reg)]
            logits.append([f[0] for f in flat])
            deltas.append([f[1] for f in flat])
        return logits, deltas, anchors

    def framework_detections(self, outputs: Mapping[str, Any],
                             metas: Sequence[Any]) -> list[Any]:
        """mmdet's own box head post-processing (`bbox_head.predict_by_feat`, what
        `model.test_step` runs) on the outputs' proposals and head outputs."""
        import torch

        props = self.proposals(outputs, metas)
        counts = [len(p) for p in props]
        logits = _numpy(outputs["roi_cls"])
        deltas = _numpy(outputs["roi_reg"])
        rois = [torch.from_numpy(np.concatenate(
            [np.full((n, 1), i, np.float32), p[:, :4]], axis=1)) for i, (n, p) in
            enumerate(zip(counts, props))]
        img_metas = self._img_metas(metas, len(metas), (0, 0))
        with torch.no_grad():
            found = self.bbox_head.predict_by_feat(
                rois=tuple(rois),
                cls_scores=tuple(torch.from_numpy(logits[i, :n]) for i, n in enumerate(counts)),
                bbox_preds=tuple(torch.from_numpy(deltas[i, :n]) for i, n in enumerate(counts)),
                batch_img_metas=img_metas, rcnn_test_cfg=self.rcnn_test_cfg, rescale=True)
        return framework_results(found)

    def predict(self, batch: Any, trace: bool = False) -> list[Any]:
        """Preprocessed Batch → final detections per image (the numpy reference after the
        torch stages)."""
        outputs = self.head_outputs(batch.inputs, batch.metas)
        return self.detections(self.decode(outputs, batch.metas), batch.metas, trace)

    def default_layers(self) -> list[str]:
        """Backbone and neck ConvModules / convs, the RoI features and the box head's fcs. A conv whose BatchNorm sits beside it (ResNet's `conv1` / `bn1`,
        `downsample.0` / `.1`) has no tensor of its own in an exported graph (the exporter
        folds the norm into it), so its block is compared instead (the stem's conv: not at
        all, the first block covers it)."""
        from torch import nn

        from harness.models.mmyolo import conv_units

        modules = dict(self.module.named_modules())
        out: list[str] = []
        for path in conv_units(self.module):
            parent, _, leaf = path.rpartition(".")
            names = [n for n, _ in modules[parent].named_children()]
            after = names[names.index(leaf) + 1] if names.index(leaf) + 1 < len(names) else None
            if after is not None and isinstance(getattr(modules[parent], after),
                                                nn.modules.batchnorm._BatchNorm):
                path = parent if parent.count(".") >= 1 else ""
            if path and path not in out:
                out.append(path)
        fcs = [name for name, m in self.bbox_head.named_modules() if isinstance(m, nn.Linear)]
        from harness.align.twostage import ROI_FEATURES

        # the RPN head runs once per level: a hook sees its last call only, so its modules
        # are left out here; its outputs (rpn_cls.l, rpn_reg.l) are compared per level. Of
        # the RoI head only the box branch is in the graph (not Mask R-CNN's mask head).
        out = [p for p in out if not p.startswith(("rpn_head.", "roi_head."))]
        return out + [ROI_FEATURES] + [f"roi_head.bbox_head.{n}" for n in fcs]

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "config": self.cfg_path, "checkpoint": self.ckpt_path, "family": self.family,
            "head": self.head_type, "num_classes": self.num_classes,
            "class_names": list(self.class_names), "nms": asdict(self.nms),
            "rpn": asdict(self.rpn),
            "nms_changed": {k: [v, getattr(self.nms, k)]
                            for k, v in asdict(self.nms_config).items()
                            if getattr(self.nms, k) != v},
            "preprocess": self.preprocess.describe(), "torch": torch.__version__,
            "device": self.device,
        }


def load_twostage_model(cfg: Any, cfg_path: Union[str, Path],
                        ckpt_path: Union[str, Path, None] = None, device: str = "cpu",
                        seed: int = 0) -> TwoStageModel:
    """Build the two-stage detector of an already-read config and load `ckpt_path` (mmdet's
    seeded random initialisation without one)."""
    check_two_stage_config(cfg, cfg_path)
    try:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    except ImportError as exc:
        raise UserError(f"the mm stack is not installed ({exc}); install harness[mm] and run "
                        "tools/build_mmcv.py") from None
    register_all_modules(init_default_scope=True)
    module, names = build_detector(MODELS, cfg, cfg_path, ckpt_path, device, seed, "mmdet",
                                   lambda m: m.roi_head.bbox_head.num_classes)
    return TwoStageModel(cfg, module, str(cfg_path), None if ckpt_path is None else str(ckpt_path),
                         names, device)
