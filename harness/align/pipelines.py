"""Each backend's post-processing as a replayable pipeline: where its NMS candidates come from
(decoded head maps, a decoded file's outputs, an NMS node's inputs) and the reference kernel
that replays its NMS in trace mode on its *own* candidates, so every detection it gave or lost
has a recorded fate (harness.nms.trace). The pipelines of files that end in their own NMS are
in harness.align.file_pipelines.

- `SourcePipeline` (alias `MmyoloPipeline`): the model source's own decode + NMS (for mmyolo,
  predict_by_feat): the PyTorch reference, and raw / decoded files, whose NMS the harness runs
  with the source's settings (its test_cfg).
- `OnnxNmsPipeline`: an end2end file ending in ONNX NonMaxSuppression.
- `PluginPipeline`: an end2end file ending in a TensorRT NMS plugin node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from harness.models.source import ModelSource


@dataclass
class Candidates:
    """A batch's NMS candidates: boxes (B, N, 4) xyxy in network-input pixels; scores (B, N, C)
    as the NMS ranks them (class probability × objectness where the head has objectness).
    nms_boxes: the boxes as the NMS node receives them when that is not xyxy (centre-size
    box coding), for the replay; None when they are `boxes`."""

    boxes: np.ndarray
    scores: np.ndarray
    decoded: Any = None  # the source's DecodedCandidates, for SourcePipeline's replay
    nms_boxes: Optional[np.ndarray] = None
    # (B, N, C) bool: the candidate was decoded from an inf / NaN head value (a saturated
    # sigmoid hides it in the score); None when the head maps are not outputs
    nonfinite: Optional[np.ndarray] = None
    # two-stage: the side's stage outputs (proposals, RoI head outputs), decoded in replay
    stages: Optional[dict] = None


@dataclass(frozen=True)
class PipelineSettings:
    """What a pipeline's NMS does, in words common to every pipeline, so two can be compared
    setting by setting. None: the pipeline has no such step.

    score_threshold / iou_threshold with whether the test is inclusive (>=) or strict (>);
    pre_topk: the candidate cap before NMS, per image or per class (`pre_topk_scope`);
    max_detections: the cap on the output per image; max_per_class: per class.
    problem: settings with which the pipeline cannot give its intended output (a TensorRT
    BatchedNMS whose keepTopK exceeds topK writes nothing), said once in the verdict.
    """

    score_threshold: Optional[float]
    score_inclusive: bool
    iou_threshold: float
    iou_inclusive: bool
    pre_topk: Optional[int] = None
    pre_topk_scope: str = "image"
    max_detections: Optional[int] = None
    max_per_class: Optional[int] = None
    problem: Optional[str] = None
    # how the NMS computes IoU: "plain" (corners, no +1), "mmcv" (plain, on boxes offset by
    # class in float32, which rounds tiny boxes), "+1 px" (BatchedNMS unnormalised, Caffe
    # semantics: +1 on widths, heights and the intersection), "+1 px areas" (unnormalised,
    # caffeSemantics 0: +1 on the areas only)
    iou_formula: str = "plain"
    # two-stage detectors' proposal step (harness.nms.rpn.RpnSettings; pre_topk is its
    # nms_pre): NMS and TopK scope ("level" / "all"), cap and IoU threshold; None elsewhere
    proposal_nms_scope: Optional[str] = None
    proposal_topk_scope: Optional[str] = None
    proposal_cap: Optional[int] = None
    proposal_iou_threshold: Optional[float] = None

    # the settings two pipelines can differ in, with the words a report uses for them
    COMPARED = {"score_threshold": "score threshold", "iou_threshold": "IoU threshold",
                "pre_topk": "pre-NMS top-k", "max_detections": "max detections",
                "max_per_class": "max per class", "iou_formula": "IoU formula",
                "proposal_nms_scope": "proposal NMS scope",
                "proposal_topk_scope": "proposal top-k scope",
                "proposal_cap": "proposal cap (RPN max_per_img)",
                "proposal_iou_threshold": "proposal NMS IoU threshold"}

    def differences(self, other: "PipelineSettings") -> dict[str, tuple[Any, Any]]:
        """setting → (this value, other value) for every compared setting that differs."""
        out = {}
        for name in self.COMPARED:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "iou_formula" and iou_family(mine) == iou_family(theirs):
                continue  # mmcv's offset boxes are the plain formula, up to float32
            if mine != theirs and not (isinstance(mine, float) and isinstance(theirs, float)
                                       and np.float32(mine) == np.float32(theirs)):
                out[name] = (mine, theirs)
        return out


def iou_family(formula: str) -> str:
    """The formula, with "mmcv" (plain IoU on class-offset boxes) counted as "plain"."""
    return "plain" if formula == "mmcv" else formula


def iou_by_formula(a: np.ndarray, b: np.ndarray, formula: str) -> float:
    """IoU of two xyxy boxes (float64) as the named formula computes it."""
    one = 0.0 if iou_family(formula) == "plain" else 1.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    if formula == "+1 px":
        iw, ih = iw + one, ih + one
    inter = float(iw * ih)
    area = (float(a[2] - a[0]) + one) * (float(a[3] - a[1]) + one) + \
        (float(b[2] - b[0]) + one) * (float(b[3] - b[1]) + one)
    return inter / (area - inter) if area - inter > 0 else 0.0


@dataclass
class Replayed:
    """One image through one pipeline: detections in original pixels (box_index = candidate
    row, trace = every candidate's fate), the candidates it ranked (boxes xyxy), and its NMS
    settings (per_class False for a class-agnostic NMS)."""

    result: Any
    boxes: np.ndarray
    scores: np.ndarray
    settings: PipelineSettings
    per_class: bool = True
    # (box, class) pairs the side's own output holds, when that output is not the replay's
    # (the PyTorch reference: mmyolo's own detections, whose tie order the replay may not share)
    output_pairs: Optional[set] = field(default=None, repr=False)
    # (N, C) bool: candidates decoded from inf / NaN head values (Candidates.nonfinite)
    nonfinite: Optional[np.ndarray] = field(default=None, repr=False)
    # two-stage: the side's proposals (harness.align.proposals.SideProposals) and, once on
    # the rows shared with the other side (harness.align.twostage.unite), why it lacks the
    # rows it lacks (row → ProposalReason)
    proposals: Any = field(default=None, repr=False)
    missing_proposals: Optional[dict] = field(default=None, repr=False)

    def box(self, row: Any, cls: Any) -> np.ndarray:
        """The box of candidate(s) (row, cls): boxes are (N, 4), one per row, or (N, C, 4)
        per row and class (a two-stage box head's per-class regression)."""
        return self.boxes[row, cls] if self.boxes.ndim == 3 else self.boxes[row]

    @property
    def iou_threshold(self) -> float:
        return self.settings.iou_threshold

    def outputs_pair(self, box: int, cls: int) -> bool:
        """Whether the side's own output holds candidate (box, cls)."""
        from harness.nms.trace import FateKind

        if self.output_pairs is None:
            return self.result.trace.fate(box, cls).kind == FateKind.KEPT
        return (box, cls) in self.output_pairs


def nonfinite_candidates(outputs: dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """(B, N, C) bool from raw head maps (`cls_scores.i`, `bbox_preds.i`, `objectnesses.i`):
    a candidate whose class logit, box deltas or objectness is inf / NaN, flattened in the
    decoder's order (level, then h, w, anchor); None without head maps."""
    def flat(kind: str, width: int) -> Optional[np.ndarray]:
        levels = sorted((int(k.rpartition(".")[2]), v) for k, v in outputs.items()
                        if k.rpartition(".")[0] == kind and k.rpartition(".")[2].isdigit())
        if not levels:
            return None
        maps = [~np.isfinite(v).transpose(0, 2, 3, 1).reshape(v.shape[0], -1, width)
                for _, v in levels]
        return np.concatenate(maps, axis=1)

    cls, deltas = outputs.get("cls_scores.0"), outputs.get("bbox_preds.0")
    if cls is None or deltas is None:
        return None
    anchors = deltas.shape[1] // 4  # the decoder reads 4 deltas per anchor
    boxes = flat("bbox_preds", 4)
    bad = flat("cls_scores", cls.shape[1] // anchors)
    bad = bad | boxes.any(axis=2, keepdims=True)
    obj = flat("objectnesses", 1)
    if obj is not None:
        bad = bad | obj
    return bad


def centre_size_to_corners(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) [cx, cy, w, h] → [x1, y1, x2, y2], float32."""
    b = np.asarray(boxes, np.float32)
    half = b[..., 2:] / np.float32(2)
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


class Pipeline:
    name = "pipeline"
    per_class = True
    settings: PipelineSettings

    def candidates(self, outputs: dict[str, np.ndarray], backend: Any,
                   inputs: np.ndarray) -> Candidates:
        raise NotImplementedError

    def replay(self, cands: Candidates, metas: Sequence[Any]) -> list[Replayed]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _scored(scores: np.ndarray, objectness: Optional[np.ndarray]) -> np.ndarray:
    if objectness is None:
        return np.asarray(scores, np.float32)
    return np.asarray(scores, np.float32) * np.asarray(objectness, np.float32)[..., None]


class SourcePipeline(Pipeline):
    """The model source's decode + NMS with its own settings (mmyolo: predict_by_feat with the
    model's test_cfg), on head outputs or decoded outputs. Named after the source's framework
    ("mmyolo")."""

    def __init__(self, model: ModelSource):
        self.model = model
        self.name = model.framework
        nms = model.nms
        # mmyolo's / mmcv's semantics (docs/nms-semantics.md): strict tests, nms_pre over (box, class)
        # pairs, IoU on class-offset boxes; yolox_style keeps every survivor
        self.settings = PipelineSettings(
            score_threshold=nms.score_thr, score_inclusive=False,
            iou_threshold=nms.iou_threshold, iou_inclusive=False, pre_topk=nms.nms_pre,
            max_detections=None if nms.yolox_style else nms.max_per_img, iou_formula="mmcv")

    def candidates(self, outputs, backend, inputs):
        decoded = self.model.decode(outputs)  # decoded outputs as they are, else decoded
        return Candidates(boxes=np.asarray(decoded.boxes, np.float32),
                          scores=_scored(decoded.scores, decoded.objectness), decoded=decoded,
                          nonfinite=nonfinite_candidates(outputs))

    def replay(self, cands, metas):
        # mmyolo filters on objectness before multiplying it in: replay from the decoded parts,
        # by the source's own numpy reference
        results = self.model.detections(cands.decoded, metas, trace=True)
        return [Replayed(r, cands.boxes[i], cands.scores[i], self.settings,
                         nonfinite=None if cands.nonfinite is None else cands.nonfinite[i])
                for i, r in enumerate(results)]

    def describe(self):
        return {"kind": self.model.framework, **asdict(self.model.nms)}


# the name compare.py imports and checks with isinstance
MmyoloPipeline = SourcePipeline


def pipeline_for(model: ModelSource, onnx_model: Any) -> Pipeline:
    """The pipeline a file's outputs go through: the NMS its graph ends with, read by
    harness.artifacts.layout (ONNX NonMaxSuppression with any pre-NMS TopK and keep cut, a
    TensorRT or mmdeploy plugin node), else the model source's own. A layout the harness does
    not know is a UserError naming it."""
    from harness.align.file_pipelines import OnnxNmsPipeline, PluginPipeline
    from harness.artifacts.layout import read_layout
    from harness.export.metadata import read_metadata

    layout = read_layout(onnx_model, read_metadata(onnx_model),
                         model.output_variant([o.name for o in onnx_model.graph.output]))
    if layout.variant != "end2end":
        return SourcePipeline(model)
    node = next(n for n in onnx_model.graph.node if (n.name or n.op_type) == layout.nms_node)
    if layout.nms_kind == "onnx":
        return OnnxNmsPipeline(node, layout, model.num_classes)
    return PluginPipeline(node, layout, model.num_classes)
