"""Batch invariance: each image of a compare batch run again alone (batch 1) on the same
backend, through the same pipeline, and its detections diffed against the ones it got inside
the batch with other images, and against a batch of the same size made of it and padding
images (the letterbox shape filled with the pad value) — with the post-NMS diff's causes
(harness.align.detections), since the question is the same: what changed, and why. A deterministic backend changes nothing; fp16 / int8
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
class _Changes:
    """One comparison's accumulated changes: the post-NMS diff with causes, the images that
    changed, the largest score and box moves of matched pairs."""

    tol: Tolerances
    diff: DetectionDiff = field(init=False)
    changed: set = field(default_factory=set)
    max_score_change: float = 0.0
    max_box_change_px: float = 0.0

    def __post_init__(self) -> None:
        self.diff = DetectionDiff(self.tol)

    def add(self, image: str, before: Any, after: Any) -> None:
        from harness.align.matching import match

        if self.diff.add_image(image, before, after):
            self.changed.add(image)
        a, b = before.result, after.result
        if len(a) and len(b):
            m = match(a.boxes, a.scores, a.labels, b.boxes, b.labels,
                      iou=self.tol.match_iou, degenerate_px=self.tol.degenerate_px)
            for r, t in m.pairs:
                self.max_score_change = max(self.max_score_change,
                                            abs(float(a.scores[r]) - float(b.scores[t])))
                self.max_box_change_px = max(self.max_box_change_px, float(
                    np.max(np.abs(a.boxes[r] - b.boxes[t]))))

    def to_json(self) -> dict[str, Any]:
        det = self.diff.summary()
        return {"changed_images": len(self.changed), "changed": sorted(self.changed)[:20],
                "detections_changed": det.mismatches,
                "causes": {k: v for k, v in det.causes.items() if v},
                "max_score_change": self.max_score_change,
                "max_box_change_px": self.max_box_change_px,
                "examples": [{"image": e.image, "cause": e.cause, "detail": e.detail}
                             for e in det.examples[:4]]}


@dataclass
class BatchInvariance:
    """One side's batch-1 runs against its batch-N runs, over all images, and its runs in a
    batch of N made of the image and N - 1 padding images (the letterbox shape, all
    `pad_value`) against batch 1 too."""

    tol: Tolerances
    batch: int
    pad_value: float = 0.0
    images: int = 0
    note: Optional[str] = None
    alone: _Changes = field(init=False)
    padded: _Changes = field(init=False)

    def __post_init__(self) -> None:
        self.alone, self.padded = _Changes(self.tol), _Changes(self.tol)

    def add_batch(self, run_one: Callable[[np.ndarray, Sequence[Any]], list[Any]],
                  inputs: np.ndarray, metas: Sequence[Any], in_batch: Sequence[Any],
                  unite: Optional[Callable[[str, Any, Any], tuple[Any, Any]]] = None) -> None:
        """run_one(inputs (n, ...), metas) → [Replayed] per image (the side's pipeline);
        in_batch: the batch run's Replayed per image."""
        if self.note is not None or inputs.shape[0] < 2:
            return
        for i, meta in enumerate(metas):
            image = Path(meta.path).name
            x = inputs[i:i + 1]
            pads = np.full((self.batch - 1, *x.shape[1:]), self.pad_value, x.dtype)
            try:
                alone = run_one(x, [meta])[0]
                padded = run_one(np.concatenate([x, pads]), [meta] * self.batch)[0]
            except UserError as exc:
                self.note = f"not measured: {exc}"
                return
            for changes, before, after in ((self.alone, in_batch[i], alone),
                                           (self.padded, padded, alone)):
                if unite is not None:
                    before, after = unite(image, before, after)
                changes.add(image, before, after)
            self.images += 1

    def to_json(self) -> dict[str, Any]:
        """The in-batch comparison's figures at the top level; the padded batch's under
        `padded`."""
        return {"batch": self.batch, "images": self.images, "note": self.note,
                **self.alone.to_json(), "padded": self.padded.to_json()}


def words(name: str, doc: Optional[dict[str, Any]]) -> str:
    """One clause for the verdict: only when something changed or could not be measured."""
    if not doc:
        return ""
    if doc.get("note"):
        return f"{name} batch invariance {doc['note']}"
    pad = doc.get("padded") or {"changed_images": 0}
    if not doc["changed_images"] and not pad["changed_images"]:
        return ""
    causes = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in doc["causes"].items())
    said = (f"{name} is not batch-invariant: {doc['changed_images']} of {doc['images']} images "
            f"change between batch 1 and batch {doc['batch']} ({doc['detections_changed']} "
            f"detections: {causes or 'none'}; scores up to {doc['max_score_change']:.3g}, "
            f"boxes up to {doc['max_box_change_px']:.3g} px)")
    if pad["changed_images"]:
        said += (f", {pad['changed_images']} beside padding images in a batch of "
                 f"{doc['batch']}")
    return said
