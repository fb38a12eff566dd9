"""What a model source gives every later stage (data, export, backends, align, eval): the
`ModelSource` protocol, and the two plain types it speaks in (`NmsSettings`, `DecodedCandidates`).

A model family is one implementation (`harness.models.mmyolo.MmyoloModel` for single-stage
mmyolo); later stages ask the source instead of knowing a framework's module layout or names.
See docs/model-sources.md for how a new family plugs in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence, Union, \
    runtime_checkable

import numpy as np

from harness.errors import UserError

if TYPE_CHECKING:
    from harness.models.pipeline import PreprocessSpec
    from harness.nms import NmsResult

# The variants a source exports itself; `end2end` is the `decoded` module with an NMS node
# after it (harness.export.wrappers.End2EndModule), whose outputs the NMS op names.
SOURCE_VARIANTS = ("raw", "decoded")


@dataclass(frozen=True)
class NmsSettings:
    """The framework's post-processing settings (mmyolo `model.test_cfg`, defaults filled in):
    score_thr (keep score > it), nms_pre (candidate cap before NMS), iou_threshold (suppress
    IoU > it), max_per_img, multi_label (a box may be kept for several classes), yolox_style
    (no max_per_img cut; objectness not pre-filtered)."""

    score_thr: float
    nms_pre: int
    iou_threshold: float
    max_per_img: int
    multi_label: bool
    yolox_style: bool

    @classmethod
    def from_test_cfg(cls, test_cfg: Any, num_classes: int) -> "NmsSettings":
        nms = dict(test_cfg.get("nms") or {})
        if nms.get("type", "nms") != "nms":
            raise UserError(f"test_cfg.nms type '{nms.get('type')}' is not supported (only 'nms')")
        return cls(
            score_thr=float(test_cfg.get("score_thr", -1)),
            nms_pre=int(test_cfg.get("nms_pre", 100000)),  # predict_by_feat's default
            iou_threshold=float(nms.get("iou_threshold", 0.5)),
            max_per_img=int(test_cfg.get("max_per_img", 100)),
            # predict_by_feat turns multi_label off for a single class
            multi_label=bool(test_cfg.get("multi_label", False)) and num_classes > 1,
            yolox_style=bool(test_cfg.get("yolox_style", False)),
        )


# the test_cfg settings a user may change on a source (ModelSource.with_nms)
NMS_CHANGEABLE = ("nms_pre", "score_thr", "iou_threshold", "max_per_img")


def nms_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """The changes with_nms was given that are set (not None); one line for an unknown one."""
    unknown = set(changes) - set(NMS_CHANGEABLE)
    if unknown:
        raise UserError(f"cannot change test_cfg {', '.join(sorted(unknown))}; the settings "
                        f"that can be set are {', '.join(sorted(NMS_CHANGEABLE))}")
    return {k: v for k, v in changes.items() if v is not None}


def framework_results(found: Sequence[Any]) -> list["NmsResult"]:
    """A framework's own per-image detections (mmengine InstanceData: bboxes, scores, labels
    as torch tensors) as NmsResults without candidate rows (box_index -1)."""
    from harness.nms import NmsResult

    results = []
    for inst in found:
        n = len(inst.scores)
        results.append(NmsResult(
            boxes=inst.bboxes.float().cpu().numpy().reshape(n, 4),
            scores=inst.scores.float().cpu().numpy(),
            labels=inst.labels.cpu().numpy().astype(np.int64),
            box_index=np.full(n, -1, np.int64)))
    return results


@dataclass
class DecodedCandidates:
    """Candidates before NMS, for a batch.

    boxes: (B, N, 4) xyxy in network-input pixels, or (B, N, C, 4) a box per class (a
    two-stage box head's per-class regression); scores: (B, N, C) after sigmoid (softmax
    without background for a two-stage head), not yet multiplied by objectness; objectness:
    (B, N) after sigmoid, or None; counts: (B,) the real rows per image when rows are padded
    to a fixed N (two-stage proposals), else None (every row is real).
    """

    boxes: np.ndarray
    scores: np.ndarray
    objectness: Union[np.ndarray, None]
    counts: Optional[np.ndarray] = None


@runtime_checkable
class ModelSource(Protocol):
    """One detector checkpoint as every stage after `models/` sees it.

    Tensors named "outputs" below are a *named* dict, keyed as the exported file's outputs
    are: the `raw` variant's names (head outputs) and/or the `decoded` variant's (`boxes`,
    `scores`, `objectness`), values numpy arrays (from any backend) or torch tensors.
    Boxes: xyxy in network-input pixels before NMS, original-image pixels after it.
    """

    # -- identity: printed, recorded in results and in exported files' metadata -----------
    family: str  # the name users know: "yolov5", "rtmdet", ...
    framework: str  # whose post-processing `framework_detections` is: "mmyolo", ...
    head_type: str  # the framework's head class, e.g. "YOLOv5Head"
    num_classes: int
    class_names: tuple[str, ...]  # (num_classes,), index = label
    cfg_path: str  # the config file (hashed into export and COCO fingerprints)
    ckpt_path: Optional[str]  # the checkpoint, None for seeded random weights

    # -- what the other stages configure themselves from ---------------------------------
    preprocess: "PreprocessSpec"  # image → (3, H, W) float32 input, the same for every backend
    nms: NmsSettings  # the framework's own NMS settings (end2end defaults, the reference)
    module: Any  # the torch nn.Module: module paths for layer hooks (`backbone.stem.conv`)
    device: str  # where `module` lives: "cpu", "cuda:0"

    def describe(self) -> dict[str, Any]:
        """Plain-JSON description for results files: config, checkpoint, family, head,
        num_classes, class_names, nms, preprocess, versions, device."""
        ...

    def copy_to(self, device: str, dtype: Any) -> "ModelSource":
        """A copy whose module is a converted deep copy on `device` in torch `dtype`; this
        source is left as it is (the PyTorch backend's fp16 / bf16 / other-device runs)."""
        ...

    def with_nms(self, **changes: Any) -> "ModelSource":
        """A copy (sharing the module) whose post-processing uses NmsSettings with `changes`
        (nms_pre, score_thr, iou_threshold, max_per_img) — in the numpy reference and in the
        framework's own detections alike; this source is left as it is. How a user aligns
        the PyTorch reference with a deployed TopK (`--nms-pre 3840`)."""
        ...

    # -- the stages, torch side (PyTorch backend, export) --------------------------------
    def head_outputs(self, images: Any, metas: Optional[Sequence[Any]] = None) -> dict[str, Any]:
        """images (B, 3, H, W) (numpy or torch; run on `device` in the module's dtype) →
        the `raw` variant's named outputs as torch tensors, in graph order. For mmyolo:
        `cls_scores.l` (B, A*C, H_l, W_l), `bbox_preds.l` (B, A*4, H_l, W_l),
        `objectnesses.l` (B, A, H_l, W_l) for heads with objectness, levels ascending.
        metas: each image's ImageMeta where a stage depends on it (two-stage: proposals are
        clipped to img_shape); None: every image fills the input."""
        ...

    def decoded_outputs(self, head: Mapping[str, Any]) -> dict[str, Any]:
        """`head_outputs`' tensors → the `decoded` variant's named outputs as torch tensors,
        computed in torch (same dtype and device): `boxes` (B, N, 4) xyxy input pixels,
        `scores` (B, N, C) class probabilities, `objectness` (B, N) where the head has it."""
        ...

    def export_module(self, variant: str) -> Any:
        """The nn.Module whose graph the `raw` or `decoded` file holds. It registers the
        detector's submodules under their own module paths (ONNX node scopes then match
        `module`'s paths: `/backbone/stem/conv/Conv`) and has
        `forward_named(images) -> dict[str, Tensor]`, whose keys are the file's output names
        in graph order (`head_outputs`' or `decoded_outputs`' names); `forward` returns its
        values as a tuple. `end2end` wraps the `decoded` module."""
        ...

    def output_variant(self, names: Sequence[str]) -> Optional[str]:
        """"raw" or "decoded" when output names `names` are this source's own variant's, else
        None (end2end outputs are the NMS op's, recognised by harness.export.outputs)."""
        ...

    # -- the stages, numpy side (every backend's outputs, the reference) -----------------
    def decode(self, outputs: Mapping[str, Any],
               metas: Optional[Sequence[Any]] = None) -> DecodedCandidates:
        """NMS candidates of a batch from named outputs: the `decoded` ones as given when
        present, else decoded from the `raw` ones exactly as the framework decodes. metas:
        where decoding clips to each image's img_shape (two-stage box heads)."""
        ...

    def detections(self, decoded: DecodedCandidates, metas: Sequence[Any],
                   trace: bool = False) -> list["NmsResult"]:
        """Per image, the framework's NMS by the harness's numpy reference (harness.nms) with
        `nms`; boxes in original-image pixels. trace=True records every candidate's fate."""
        ...

    def framework_detections(self, outputs: Mapping[str, Any],
                             metas: Sequence[Any]) -> list["NmsResult"]:
        """Per image, the framework's OWN post-processing on the `raw` named outputs (mmyolo:
        the head's predict_by_feat), boxes in original-image pixels, box_index -1. The compare
        run's reference column; the numpy reference (`detections`) must agree with it."""
        ...

    def predict(self, batch: Any, trace: bool = False) -> list["NmsResult"]:
        """A preprocessed Batch → `detections` per image (head_outputs → decode → NMS)."""
        ...

    # -- alignment -----------------------------------------------------------------------
    def default_layers(self) -> list[str]:
        """Module paths worth comparing layer by layer when the user names none, in
        definition order (mmyolo: every ConvModule and every conv outside one)."""
        ...

    # Hook a two-stage source (mmdet Faster R-CNN) needs at the same stages: the RPN's
    # proposals, aligned between backends before the RoI head's detections are. A one-stage
    # source has none. (Its rpn test_cfg stays inside the source: `nms` is the final NMS.)
    def proposals(self, outputs: Mapping[str, Any],
                  metas: Sequence[Any]) -> Optional[list[np.ndarray]]:
        """Per image the proposals (K, 5) [x1, y1, x2, y2, score] in input pixels that the
        named outputs lead to, or None for a single-stage detector."""
        ...
