"""What `harness compare` writes: the `compare` section of results.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from harness.results.base import Schema, _from_json


@dataclass
class Unreadable(Schema):
    image: str
    reason: str


@dataclass
class CompareInputs(Schema):
    """images: the files asked for; count: those read and compared; sha256: per batch."""

    images: list[str]
    count: int
    batch: int
    sha256: list[str]
    preprocess: dict[str, Any]
    requested: Optional[int] = None
    unreadable: list[Unreadable] = field(default_factory=list)
    note: str = "every backend received these exact bytes"


@dataclass
class LayerRow(Schema):
    """One compared layer: metrics over the elements finite on both sides."""

    module: str
    tensor: str
    depth: int
    rel_l2: float
    max_abs: float
    mean_abs: float
    cosine: float
    node: Optional[str] = None
    shape: Optional[list[int]] = None
    nonfinite: int = 0
    nonfinite_target: int = 0
    nonfinite_reference: int = 0


@dataclass
class LayerPoint(Schema):
    """The first layer past a tolerance."""

    module: str
    depth: int
    rel_l2: float
    tolerance: float
    tensor: Optional[str] = None


@dataclass
class NonfiniteLayer(Schema):
    """The first layer with inf / NaN values: how many in the target, how many in PyTorch."""

    module: str
    depth: int
    target: int
    reference: int
    tensor: Optional[str] = None


@dataclass
class LayerSummary(Schema):
    """A target's layer diff; `note` says why there is none (rows empty)."""

    rows: list[LayerRow]
    metric: str = "rel_l2"
    tolerance: Optional[float] = None
    precision: Optional[str] = None
    first_divergence: Optional[LayerPoint] = None
    first_past_tolerance: Optional[LayerPoint] = None
    first_nonfinite: Optional[NonfiniteLayer] = None
    layers_with_nonfinite: int = 0
    worst: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    # ConvModule parts asked for, compared as their ConvModule (the exporter fuses them)
    replaced: dict[str, str] = field(default_factory=dict)
    # how modules were found in the file: by name, under a wrapper's prefix (easydeploy's
    # /baseModel/), by their scope's tail, by graph position; and how many were not
    mapped: dict[str, int] = field(default_factory=dict)
    # why the modules no name found were not mapped by position (refused or not tried)
    mapping_note: Optional[str] = None
    marking_changed_outputs_rel_l2: Optional[float] = None
    note: Optional[str] = None


@dataclass
class CandidateSummary(Schema):
    """Boxes and scores before NMS, target against PyTorch; `born`: where a difference
    started (none | in_nms | before_nms | unknown, with `note`)."""

    born: str
    box_max_abs: Optional[float] = None
    box_rel_l2: Optional[float] = None
    score_max_abs: Optional[float] = None
    score_rel_l2: Optional[float] = None
    score_threshold: Optional[float] = None
    above_threshold_reference: Optional[int] = None
    above_threshold_target: Optional[int] = None
    note: Optional[str] = None
    # the target's boxes are PyTorch's in the other coding (centre-size vs corners)
    box_coding: Optional[str] = None


@dataclass
class MismatchExample(Schema):
    image: str
    cause: str
    side: str
    score: float
    detail: str
    box: int = -1
    rank: Optional[int] = None
    limit: Optional[int] = None
    setting: Optional[str] = None
    class_name: Optional[str] = None  # "class" in JSON

    def to_json(self) -> dict[str, Any]:
        doc = super().to_json()
        doc["class"] = doc.pop("class_name")
        return doc

    @classmethod
    def from_json(cls, value: Any, path: str = ""):
        if isinstance(value, dict) and "class" in value:
            value = {**value, "class_name": value["class"]}
            value.pop("class")
        return _from_json(cls, value, path)


@dataclass
class SettingDifference(Schema):
    """One NMS setting the target sets differently, and how many mismatches it decided."""

    setting: str
    label: str
    reference: Any
    target: Any
    explains: int


@dataclass
class DetectionSummary(Schema):
    """The post-NMS diff of one target: counts, one cause per mismatch, tie groups per side,
    settings differences, and the worst examples."""

    reference: int
    target: int
    matched: int
    match_rate: float
    mismatches: int
    unexplained: int
    causes: dict[str, int]
    ties: dict[str, int] = field(default_factory=lambda: {"reference": 0, "target": 0})
    degenerate_matched: int = 0
    settings_differ: list[SettingDifference] = field(default_factory=list)
    settings_problem: Optional[str] = None
    tolerances: dict[str, float] = field(default_factory=dict)
    examples: list[MismatchExample] = field(default_factory=list)


@dataclass
class TargetResult(Schema):
    """One file compared with PyTorch; `available` False (and `reason`) when it was not
    (status not_available: nothing can run it here; failed: it could not be compared)."""

    name: str
    path: str
    kind: str
    available: bool
    precision: str
    status: str = "ok"
    reason: Optional[str] = None
    backend: dict[str, Any] = field(default_factory=dict)
    variant: Optional[str] = None
    pipeline: Optional[dict[str, Any]] = None
    layers: Optional[LayerSummary] = None
    candidates: Optional[CandidateSummary] = None
    # two-stage: the proposal diff (harness.align.proposals.ProposalDiff.summary(), and
    # not_replayed: the target's proposals its RPN replay does not keep)
    proposals: Optional[dict[str, Any]] = None
    detections: Optional[DetectionSummary] = None
    # each image run alone (batch 1) against its in-batch detections on this backend
    # (harness.align.batch_invariance.BatchInvariance.to_json()); None at batch 1
    batch_invariance: Optional[dict[str, Any]] = None
    replay_disagrees: Optional[int] = None
    # `harness check` of the target's ONNX (harness.export.check.CheckResult.to_json()), or
    # {"error": why it could not run}; None without an ONNX file
    tensorrt_check: Optional[dict[str, Any]] = None


@dataclass
class CompareResult(Schema):
    created: str
    seconds: float
    model: dict[str, Any]
    inputs: CompareInputs
    reference: dict[str, Any]
    targets: list[TargetResult]
    verdict: str
