"""The mmyolo model source: an mmyolo config + checkpoint as a PyTorch module, with the
preprocessing, decoding and NMS settings read from the same config; `MmyoloModel` implements
harness.models.source.ModelSource for every single-stage mmyolo head.

Exposes each stage as data: raw head maps, decoded candidates before NMS (boxes in input
pixels, per-class scores, objectness), and final detections in original-image pixels
(computed by harness.nms's numpy reference of mmyolo's pipeline, not by mmyolo).
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
    SOURCE_VARIANTS, DecodedCandidates, NmsSettings, framework_results, nms_changes,
)

__all__ = ["FAMILIES", "RAW_KINDS", "DecodedCandidates", "MmyoloModel", "NmsSettings",
           "load_mmyolo_model", "read_config"]

# mmyolo head type → the family name users know. Every one of these inherits
# YOLOv5Head.predict_by_feat, whose decode and NMS steps the harness reproduces.
FAMILIES = {
    "YOLOv5Head": "yolov5", "YOLOv6Head": "yolov6", "YOLOv7Head": "yolov7",
    "YOLOv8Head": "yolov8", "YOLOXHead": "yolox", "RTMDetHead": "rtmdet",
    "PPYOLOEHead": "ppyoloe",
}
RAW_KINDS = ("cls_scores", "bbox_preds", "objectnesses")


def flat_head_outputs(raw: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """{kind: [level maps]} (MmyoloModel.raw_outputs) as the `raw` variant's flat names
    `cls_scores.0`, ... (kinds in raw_outputs' order, levels ascending)."""
    return {f"{kind}.{level}": t for kind, maps in raw.items() for level, t in enumerate(maps)}


def grouped_head_maps(outputs: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Named outputs `cls_scores.0`, ... back into {kind: [level tensors]}; numpy arrays
    become CPU torch tensors, torch tensors are kept as they are; names without a `.level`
    suffix (`boxes`, ...) are left out. A dict already grouped ({kind: [maps]}) is returned
    as it is."""
    import torch

    if outputs and all(isinstance(v, (list, tuple)) for v in outputs.values()):
        return {kind: list(maps) for kind, maps in outputs.items()}
    levels: dict[str, dict[int, Any]] = {}
    for name, value in outputs.items():
        kind, _, level = name.rpartition(".")
        if kind and level.isdigit():
            levels.setdefault(kind, {})[int(level)] = value if torch.is_tensor(value) \
                else torch.from_numpy(np.asarray(value))
    return {kind: [maps[i] for i in sorted(maps)] for kind, maps in levels.items()}


def output_variant(names: Sequence[str]) -> Optional[str]:
    """"decoded" (boxes + scores), "raw" (cls_scores.l + bbox_preds.l) or None: which of the
    mmyolo source's own variants output names `names` are. Decoded first, so a backend that
    returns both sets (the PyTorch backend's "all") is read from its decoded outputs."""
    have = set(names)
    if {"boxes", "scores"} <= have:
        return "decoded"
    if any(n.startswith("cls_scores.") for n in have) and \
            any(n.startswith("bbox_preds.") for n in have):
        return "raw"
    return None


def conv_units(module: Any) -> list[str]:
    """The layers worth comparing in an mmyolo detector: every ConvModule (conv + norm +
    activation, the unit the exporter and TensorRT fuse) and every convolution outside one
    (the prediction convs of the heads), in definition order."""
    from torch import nn

    chosen: list[str] = []
    blocks: list[str] = []
    for name, m in module.named_modules():
        if not name:
            continue
        if type(m).__name__ == "ConvModule":
            chosen.append(name)
            blocks.append(name + ".")
        elif isinstance(m, nn.Conv2d) and not name.startswith(tuple(blocks)):
            chosen.append(name)
    return chosen


def _numpy(value: Any) -> Any:
    """A torch tensor as a float32 numpy array; anything else as it is."""
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return value


def _import_mm() -> None:
    try:
        import mmdet  # noqa: F401
        import mmyolo  # noqa: F401
        from mmyolo.utils import register_all_modules
    except ImportError as exc:
        raise UserError(f"the mm stack is not installed ({exc}); install harness[mm] and run "
                        "tools/build_mmcv.py") from None
    register_all_modules(init_default_scope=True)


def read_config(cfg_path: Union[str, Path]) -> Any:
    """An mmyolo detector config; one line for anything else."""
    from harness.models.config import read_config_file

    p = Path(cfg_path)
    cfg = read_config_file(p)
    model = cfg.get("model")
    from harness.models.mmdet_twostage import is_two_stage

    if is_two_stage(model):
        raise UserError(f"config {p} is a two-stage detector ({model.get('type')}): load it "
                        "with harness.models.config.load_model_source (every harness command "
                        "does)")
    if not isinstance(model, dict) or "bbox_head" not in model:
        raise UserError(f"config {p} is not an mmyolo detector config (no model.bbox_head)")
    head_type = str(model["bbox_head"].get("type", "")).split(".")[-1]
    if head_type not in FAMILIES:
        raise UserError(f"config {p} has head {head_type or '?'}; harness supports the mmyolo "
                        f"heads {', '.join(FAMILIES)}")
    return cfg


class MmyoloModel:
    """One mmyolo detector as a ModelSource (harness.models.source): its module,
    preprocessing spec, NMS settings and class names, and each stage of predict_by_feat."""

    framework = "mmyolo"

    def __init__(self, cfg: Any, module: Any, cfg_path: str, ckpt_path: Union[str, None],
                 class_names: tuple[str, ...], device: str):
        self.cfg = cfg
        self.module = module
        self.cfg_path = cfg_path
        self.ckpt_path = ckpt_path
        self.device = device
        head = module.bbox_head
        self.head_type = type(head).__name__
        self.family = FAMILIES.get(self.head_type, self.head_type)
        self.num_classes = int(head.num_classes)
        self.class_names = class_names
        self.preprocess: PreprocessSpec = preprocess_spec_from_config(cfg)
        self.nms = NmsSettings.from_test_cfg(head.test_cfg, self.num_classes)
        self.nms_config = self.nms  # as the config says; `nms` may be changed (with_nms)
        # what predict_by_feat reads: the head's test_cfg, or a changed copy (with_nms)
        self.test_cfg = head.test_cfg

    def with_nms(self, **changes: Any) -> "MmyoloModel":
        import copy
        import dataclasses

        changes = nms_changes(changes)
        if not changes:
            return self
        other = copy.copy(self)
        other.nms = dataclasses.replace(self.nms, **changes)
        cfg = copy.deepcopy(self.test_cfg)
        for key in ("nms_pre", "score_thr", "max_per_img"):
            if key in changes:
                cfg[key] = changes[key]
        if "iou_threshold" in changes:
            cfg["nms"] = {**dict(cfg.get("nms") or {"type": "nms"}),
                          "iou_threshold": changes["iou_threshold"]}
        other.test_cfg = cfg
        return other

    def copy_to(self, device: str, dtype: Any) -> "MmyoloModel":
        import copy

        other = copy.copy(self)
        other.module = copy.deepcopy(self.module).to(device=device, dtype=dtype)
        other.device = device
        return other

    # -- ModelSource: torch side ---------------------------------------------------------

    def head_outputs(self, images: Any, metas: Optional[Sequence[Any]] = None) -> dict[str, Any]:
        """metas: unused (a one-stage head does not depend on the image shapes)."""
        return flat_head_outputs(self.raw_outputs(images))

    def decoded_outputs(self, head: Mapping[str, Any]) -> dict[str, Any]:
        boxes, scores, objectness = self.decode_torch(grouped_head_maps(head))
        out = {"boxes": boxes, "scores": scores}
        if objectness is not None:
            out["objectness"] = objectness
        return out

    def export_module(self, variant: str) -> Any:
        from harness.models.mmyolo_modules import MmyoloDecodedModule, MmyoloRawModule

        if variant not in SOURCE_VARIANTS:
            raise ValueError(f"the mmyolo source exports {', '.join(SOURCE_VARIANTS)}, "
                             f"not '{variant}'")
        return MmyoloRawModule(self) if variant == "raw" else MmyoloDecodedModule(self)

    def output_variant(self, names: Sequence[str]) -> Optional[str]:
        return output_variant(names)

    # -- mmyolo's stages, as predict_by_feat runs them ------------------------------------

    def raw_outputs(self, inputs: Any) -> dict[str, list[Any]]:
        """Head maps as torch tensors: {'cls_scores': [per level (B, A*C, H, W)],
        'bbox_preds': [...], 'objectnesses': [...] (heads with objectness only)}."""
        import torch

        x = torch.as_tensor(inputs, device=self.device)
        with torch.no_grad():
            outs = self.module.bbox_head(self.module.extract_feat(x))
        return {kind: list(maps) for kind, maps in zip(RAW_KINDS, outs) if maps is not None}

    def decode_torch(self, raw: dict[str, list[Any]]) -> tuple[Any, Any, Any]:
        """(boxes (B,N,4), scores (B,N,C), objectness (B,N) or None) as torch tensors,
        computed exactly as YOLOv5Head.predict_by_feat does before filtering."""
        import torch

        head = self.module.bbox_head
        cls_scores, bbox_preds = raw["cls_scores"], raw["bbox_preds"]
        objectnesses = raw.get("objectnesses")
        num_imgs = cls_scores[0].shape[0]
        featmap_sizes = [c.shape[2:] for c in cls_scores]
        priors, strides = self._priors(featmap_sizes, cls_scores[0].dtype, cls_scores[0].device)
        scores = torch.cat([c.permute(0, 2, 3, 1).reshape(num_imgs, -1, head.num_classes)
                            for c in cls_scores], dim=1).sigmoid()
        deltas = torch.cat([b.permute(0, 2, 3, 1).reshape(num_imgs, -1, 4)
                            for b in bbox_preds], dim=1)
        boxes = head.bbox_coder.decode(priors[None], deltas, strides)
        objectness = None
        if objectnesses is not None:
            objectness = torch.cat([o.permute(0, 2, 3, 1).reshape(num_imgs, -1)
                                    for o in objectnesses], dim=1).sigmoid()
        return boxes, scores, objectness

    def _priors(self, featmap_sizes: Sequence[Any], dtype: Any, device: Any) -> tuple[Any, Any]:
        """(priors, strides) of the head for these feature map sizes, made once per sizes,
        dtype and device (a fast post-processing call would otherwise spend ~20 of its device
        ops on them every batch); computed anew while tracing (an export), where they
        follow the graph's shapes."""
        import torch

        head = self.module.bbox_head
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        key = (tuple(tuple(int(v) for v in size) for size in featmap_sizes), dtype, str(device))
        cache = {} if tracing else self.__dict__.setdefault("_priors_cache", {})
        if key not in cache:
            priors = torch.cat(head.prior_generator.grid_priors(featmap_sizes, dtype=dtype,
                                                                device=device))
            strides = torch.cat([
                priors.new_full((size.numel() * head.num_base_priors,), stride)
                for size, stride in zip(featmap_sizes, head.featmap_strides)])
            cache[key] = (priors, strides)
        return cache[key]

    # -- ModelSource: numpy side ---------------------------------------------------------

    def decode(self, outputs: Mapping[str, Any],
               metas: Optional[Sequence[Any]] = None) -> DecodedCandidates:
        """Decoded candidates from named outputs (`boxes`, `scores`, `objectness` taken as
        they are when present, else decoded from `cls_scores.l`, ...) or from raw_outputs'
        {kind: [level maps]}."""
        import torch

        if "boxes" in outputs and "scores" in outputs:
            obj = outputs.get("objectness")
            return DecodedCandidates(boxes=_numpy(outputs["boxes"]),
                                     scores=_numpy(outputs["scores"]),
                                     objectness=None if obj is None else _numpy(obj))
        raw = grouped_head_maps(outputs)
        if "cls_scores" not in raw or "bbox_preds" not in raw:
            raise UserError(f"outputs {', '.join(sorted(outputs))} hold neither mmyolo's "
                            "decoded candidates (boxes, scores) nor its head maps "
                            "(cls_scores.l, bbox_preds.l)")
        with torch.no_grad():
            boxes, scores, obj = self.decode_torch(raw)
        return DecodedCandidates(
            boxes=boxes.float().cpu().numpy(), scores=scores.float().cpu().numpy(),
            objectness=None if obj is None else obj.float().cpu().numpy())

    def detections(self, decoded: DecodedCandidates, metas: Sequence[Any],
                   trace: bool = False) -> list[Any]:
        """mmyolo-style NMS per image (harness.nms reference); boxes in original pixels."""
        from harness.data.preprocess import pad_left_top
        from harness.nms import mmyolo_nms

        results = []
        for i, meta in enumerate(metas):
            results.append(mmyolo_nms(
                decoded.boxes[i], decoded.scores[i],
                None if decoded.objectness is None else decoded.objectness[i],
                **asdict(self.nms), pad_left_top=pad_left_top(meta),
                scale_factor=meta.scale_factor, clamp_hw=meta.ori_shape, trace=trace))
        return results

    def framework_detections(self, outputs: Mapping[str, Any],
                             metas: Sequence[Any]) -> list[Any]:
        return self.mmyolo_detections(outputs, metas)

    def mmyolo_detections(self, raw: Mapping[str, Any], metas: Sequence[Any]) -> list[Any]:
        """mmyolo's own detections for a batch: the head's `predict_by_feat` (what
        `model.test_step` runs after the data preprocessor) on head maps `raw` (named
        outputs `cls_scores.0`, ... or raw_outputs' {kind: [level maps]}), with the
        harness's image metas. Returns per image an NmsResult without candidate rows
        (box_index -1): its order of tied scores is torch's, which no replay promises."""
        import torch

        head = self.module.bbox_head
        img_metas = [{"ori_shape": tuple(m.ori_shape), "img_shape": tuple(m.img_shape),
                      "scale_factor": tuple(m.scale_factor),
                      **({"pad_param": np.asarray(m.pad_param, np.float32)}
                         if m.pad_param is not None else {})} for m in metas]
        maps = {k: [torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v,
                                    device=self.device) for v in levels]
                for k, levels in grouped_head_maps(raw).items()}
        with torch.no_grad():
            found = head.predict_by_feat(
                maps["cls_scores"], maps["bbox_preds"], maps.get("objectnesses"),
                batch_img_metas=img_metas, cfg=self.test_cfg, rescale=True, with_nms=True)
        return framework_results(found)

    def predict(self, batch: Any, trace: bool = False) -> list[Any]:
        """Preprocessed Batch → final detections per image."""
        return self.detections(self.decode(self.raw_outputs(batch.inputs)), batch.metas, trace)

    def default_layers(self) -> list[str]:
        return conv_units(self.module)

    def proposals(self, outputs: Mapping[str, Any],
                  metas: Sequence[Any]) -> Optional[list[np.ndarray]]:
        return None  # single-stage: no proposals

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "config": self.cfg_path, "checkpoint": self.ckpt_path, "family": self.family,
            "head": self.head_type, "num_classes": self.num_classes,
            "class_names": list(self.class_names), "nms": asdict(self.nms),
            # settings changed from the config's test_cfg (with_nms): name → [config, used]
            "nms_changed": {k: [v, getattr(self.nms, k)]
                            for k, v in asdict(self.nms_config).items()
                            if getattr(self.nms, k) != v},
            "preprocess": self.preprocess.describe(), "torch": torch.__version__,
            "device": self.device,
        }


def load_mmyolo_model(cfg_path: Union[str, Path], ckpt_path: Union[str, Path, None] = None,
                      device: str = "cpu", seed: int = 0) -> MmyoloModel:
    """Build the detector of `cfg_path` and load `ckpt_path` into it.

    Without a checkpoint the weights are mmyolo's own random initialisation (seeded). Either
    path may name a file shipped in the package (`harness:fixture/...`).
    """
    from harness.experiment import resolve_path

    cfg_path = resolve_path(cfg_path)
    ckpt_path = None if ckpt_path is None else resolve_path(ckpt_path)
    cfg = read_config(cfg_path)
    _import_mm()
    from mmyolo.registry import MODELS

    module, names = build_detector(MODELS, cfg, cfg_path, ckpt_path, device, seed, "mmyolo",
                                   lambda m: m.bbox_head.num_classes)
    return MmyoloModel(cfg, module, str(cfg_path), None if ckpt_path is None else str(ckpt_path),
                       names, device)
