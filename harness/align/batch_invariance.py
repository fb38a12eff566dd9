"""Batch invariance: each image of a compare batch run again alone (batch 1) on the same
backend, through the same pipeline, and its detections diffed against the ones it got inside
the batch — with the post-NMS diff's causes (harness.align.detections), since the question
is the same: what changed, and why. A deterministic backend changes nothing; fp16 / int8
kernels chosen per batch size may, and the section says by how much.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness.align.detections import DetectionDiff, Tolerances
from harness.errors import UserError


@dataclass
class BatchInvariance:
    """One side's batch-1 runs against its batch-N runs, over all images. `replay(outputs,
    inputs, metas)` turns a backend's outputs into the side's per-image Replayed (its
    pipeline); `unite` (two-stage) puts a pair of Replayed on shared rows."""

    tol: Tolerances
    batch: int
    diff: DetectionDiff = field(init=False)
    images: int = 0
    changed: set = field(default_factory=set)
    max_score_change: float = 0.0
    max_box_change_px: float = 0.0
    note: Optional[str] = None

    def __post_init__(self) -> None:
        self.diff = DetectionDiff(self.tol)

    def add_batch(self, run_one: Callable[[np.ndarray, Sequence[Any]], list[Any]],
                  inputs: np.ndarray, metas: Sequence[Any], in_batch: Sequence[Any],
                  unite: Optional[Callable[[str, Any, Any], tuple[Any, Any]]] = None) -> None:
        """run_one(inputs (1, ...), [meta]) → [Replayed] of that image alone; in_batch: the
        batch run's Replayed per image."""
        if self.note is not None or inputs.shape[0] < 2:
            return
        for i, meta in enumerate(metas):
            try:
                alone = run_one(inputs[i:i + 1], [meta])[0]
            except UserError as exc:
                self.note = f"not measured: {exc}"
                return
            image = Path(meta.path).name
            before, after = in_batch[i], alone
            if unite is not None:
                before, after = unite(image, before, after)
            found = self.diff.add_image(image, before, after)
            self.images += 1
            if found:
                self.changed.add(image)
            a, b = before.result, after.result
            if len(a) and len(b):
                from harness.align.matching import match

                m = match(a.boxes, a.scores, a.labels, b.boxes, b.labels,
                          iou=self.tol.match_iou, degenerate_px=self.tol.degenerate_px)
                for r, t in m.pairs:
                    self.max_score_change = max(self.max_score_change,
                                                abs(float(a.scores[r]) - float(b.scores[t])))
                    self.max_box_change_px = max(self.max_box_change_px, float(
                        np.max(np.abs(a.boxes[r] - b.boxes[t]))))

    def to_json(self) -> dict[str, Any]:
        det = self.diff.summary()
        return {"batch": self.batch, "images": self.images,
                "changed_images": len(self.changed), "changed": sorted(self.changed)[:20],
                "detections_changed": det.mismatches,
                "causes": {k: v for k, v in det.causes.items() if v},
                "max_score_change": self.max_score_change,
                "max_box_change_px": self.max_box_change_px, "note": self.note,
                "examples": [{"image": e.image, "cause": e.cause, "detail": e.detail}
                             for e in det.examples[:4]]}


def words(name: str, doc: Optional[dict[str, Any]]) -> str:
    """One clause for the verdict: only when something changed or could not be measured."""
    if not doc:
        return ""
    if doc.get("note"):
        return f"{name} batch invariance {doc['note']}"
    if not doc["changed_images"]:
        return ""
    causes = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in doc["causes"].items())
    return (f"{name} is not batch-invariant: {doc['changed_images']} of {doc['images']} images "
            f"change between batch 1 and batch {doc['batch']} ({doc['detections_changed']} "
            f"detections: {causes}; scores up to {doc['max_score_change']:.3g}, boxes up to "
            f"{doc['max_box_change_px']:.3g} px)")
