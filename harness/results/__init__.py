"""The results schema: what `harness compare`, `harness coco` and `harness sensitivity`
produce, as dataclasses that the commands write, the reports render and the gates check — one
definition of every key in `results.json` (docs/results-schema.md describes it for
readers). A file of another schema version is refused in one line; a value a reader needs
and the file lacks is named (`Missing`), never guessed.
"""
from __future__ import annotations

from harness.results.base import Missing, Schema, atomic_write_text
from harness.results.coco import COCO_STATS, CocoDataset, CocoResult, CocoRow
from harness.results.compare import (
    CandidateSummary, CompareInputs, CompareResult, DetectionSummary, LayerPoint, LayerRow,
    LayerSummary, MismatchExample, NonfiniteLayer, SettingDifference, TargetResult,
    Unreadable,
)
from harness.results.sensitivity import (
    SensitivityGroup, SensitivityHoldout, SensitivityResult, SensitivityStep,
)
from harness.results.file import (
    RESULTS_NAME, SCHEMA_VERSION, SECTIONS, ExperimentSection, Results, read_results,
    write_section,
)

__all__ = [
    "COCO_STATS", "RESULTS_NAME", "SCHEMA_VERSION", "SECTIONS", "CandidateSummary",
    "CocoDataset", "CocoResult", "CocoRow", "CompareInputs", "CompareResult",
    "DetectionSummary", "ExperimentSection", "LayerPoint", "LayerRow", "LayerSummary",
    "MismatchExample", "Missing", "NonfiniteLayer", "Results", "Schema",
    "SensitivityGroup", "SensitivityHoldout", "SensitivityResult", "SensitivityStep",
    "SettingDifference", "TargetResult", "Unreadable", "atomic_write_text", "read_results",
    "write_section",
]
