"""What `harness sensitivity` produces: the `sensitivity` section of results.json — each
layer group's AP when kept in fp32 alone, the greedy search's steps, and the chosen set."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from harness.results.base import Schema


@dataclass
class SensitivityGroup(Schema):
    """One layer group: module path, class, ONNX node-name prefix (also the TensorRT
    layer-name prefix), its nodes and quantized ops, its GFLOPs per image (2 x MACs of its
    quantized ops) and share of the network's; AP with it alone kept in fp32, the AP that
    recovers over the all-quantized model, that per GFLOP, and its rank (1 = best)."""

    name: str
    kind: str
    prefix: str
    nodes: int
    quantized_ops: int
    gflops: float
    flop_share: float
    AP: Optional[float] = None
    recovered: Optional[float] = None
    recovered_per_gflop: Optional[float] = None
    rank: Optional[int] = None


@dataclass
class SensitivityStep(Schema):
    """One greedy step: the group tried on top of the set kept so far, the set measured, its
    AP and ΔAP against fp32, and whether the group stayed (it raised the AP)."""

    added: str
    groups: list[str]
    AP: float
    delta_AP: float
    kept: bool
    flop_share: float


@dataclass
class SensitivityHoldout(Schema):
    """The chosen set checked on images the search did not see (the next ones by id): AP of
    fp32, of every group converted, and of the chosen set there."""

    images: int
    AP_fp32: float
    AP_quantized: float
    AP_chosen: float

    @property
    def recovered_fraction(self) -> Optional[float]:
        loss = self.AP_fp32 - self.AP_quantized
        return (self.AP_chosen - self.AP_quantized) / loss if loss > 0 else None


@dataclass
class SensitivityResult(Schema):
    """AP_fp32: the fp32 ONNX on onnxruntime CPU (the reference); AP_quantized: every group
    at `precision`; delta_AP_*: AP − AP_fp32; chosen: the groups kept in fp32, with their
    AP, ΔAP, recovered AP (its share of the quantized ΔAP: recovered_fraction) and share of
    the network's FLOPs left in fp32; limit: the ΔAP allowed (absolute AP) and as given;
    met: whether the chosen set is within it; holdout: the same on held-out images (None
    without --holdout); files: what was written (names in --out)."""

    created: str
    seconds: float
    precision: str
    level: str
    model: dict[str, Any]
    dataset: dict[str, Any]
    calibration: Optional[dict[str, Any]]
    evaluator: str
    reference: str
    total_gflops: float
    AP_fp32: float
    AP_quantized: float
    delta_AP_quantized: float
    limit: float
    limit_given: str
    order: str
    groups: list[SensitivityGroup]
    steps: list[SensitivityStep]
    chosen: list[str]
    AP_chosen: float
    delta_AP_chosen: float
    recovered_chosen: float
    recovered_fraction: Optional[float]
    chosen_flop_share: float
    met: bool
    verdict: str
    holdout: Optional[SensitivityHoldout] = None
    measurements: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
