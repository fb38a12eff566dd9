"""The AP of one precision variant on the evaluation subset: onnxruntime on the CPU through
the same pass, post-processing (the model's NMS settings) and COCO evaluation `harness coco`
uses. Per-image detections go to a RunStore as batches finish and the AP to the
MeasurementStore once evaluated, so an interrupted run resumes mid-variant and a measured
variant is neither converted nor run again.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from harness.sensitivity.groups import LayerGroup
from harness.sensitivity.store import MeasurementStore


@dataclass
class Subset:
    """What every measurement shares: model (ModelSource), split (CocoSplit, the subset's
    images), category_ids / names_by_cat (coco_split.category_ids_for and its inverse),
    evaluator, batch size, whether to show progress bars, and where to say what happens."""

    model: Any
    split: Any
    category_ids: list[int]
    names_by_cat: dict[int, str]
    evaluator: str
    batch: int
    progress: bool
    log: Callable[[str], None]

    def run_header(self, variant_key: str) -> dict[str, Any]:
        """What a variant's per-image records depend on (not the image count: a longer run
        after a shorter one keeps what that one computed, as `harness coco` does)."""
        from harness.export.metadata import file_sha256

        return {"configuration": f"sensitivity-{variant_key}",
                "nms": asdict(self.model.nms),
                "annotations_sha256": file_sha256(self.split.annotations),
                "images_dir": str(Path(self.split.images_dir).resolve()), "batch": self.batch}

    def describe(self) -> dict[str, Any]:
        return {"image_ids": self.split.image_ids, "evaluator": self.evaluator,
                "batch": self.batch}


class Meter:
    """Measures variants: `measure(key, label, groups, make)`, where make(path) writes the
    variant's ONNX file at `path` (or returns an existing file's path, the fp32 one); it is
    called only when some image still needs running. `measured` / `reused` count the
    variants measured now / found stored by an earlier run; each is logged once."""

    def __init__(self, subset: Subset, store: MeasurementStore, work_dir: Path):
        self.subset = subset
        self.store = store
        self.work_dir = Path(work_dir)
        self.measured = 0
        self.reused = 0
        self._earlier = set(store.records)  # measured by an earlier run

    def measure(self, key: str, label: str, groups: Sequence[LayerGroup],
                make: Callable[[Path], Path], keep_file: bool = False) -> dict[str, Any]:
        """The stored record of variant `key` ({"AP", "stats", "groups", "images", ...}),
        measuring it first when it is not stored. keep_file: leave the variant's ONNX in
        the work folder (else it is deleted once measured)."""
        found = self.store.get(key)
        if found is not None:
            if key in self._earlier:
                self._earlier.discard(key)
                self.reused += 1
                self.subset.log(f"{label}: AP {found['AP']:.4f} (stored)")
            return found
        from harness.eval.coco_pass import run_pass
        from harness.eval.coco_scores import evaluate
        from harness.eval.store import RunStore
        from harness.export.outputs import detections_from_outputs

        sub = self.subset
        started = time.perf_counter()
        runs = RunStore(self.work_dir / "runs" / f"{key[:24]}.jsonl",
                        sub.run_header(key)).open()
        images = list(sub.split.images)
        variant_path = self.work_dir / "variants" / f"{key[:24]}.onnx"
        onnx_path: Optional[Path] = None
        if not all(runs.done(im.image_id) for im in images):
            done = sum(runs.done(im.image_id) for im in images)
            if done:
                sub.log(f"{label}: resuming, {done} of {len(images)} images already done")
            onnx_path = make(variant_path)
            backend = _open(onnx_path)
            from harness.eval.runner import spec_for

            model = sub.model
            run_pass(images, sub.batch, spec_for(model, backend), backend.infer,
                     lambda outputs, metas: detections_from_outputs(model, outputs, metas),
                     sub.category_ids, runs, desc=label, progress=sub.progress,
                     warn=sub.log)
        ids = [im.image_id for im in images]
        readable = [i for i in ids if not runs.images[i].get("unreadable")]
        scores = evaluate(sub.split.coco, runs.detections(readable), readable,
                          sub.names_by_cat, sub.evaluator)
        record = self.store.add(key, {
            "label": label, "groups": [g.name for g in groups], "AP": scores.stats["AP"],
            "stats": scores.stats, "images": len(readable),
            "unreadable": len(ids) - len(readable),
            "seconds": round(time.perf_counter() - started, 2)})
        self.measured += 1
        self.subset.log(f"{label}: AP {record['AP']:.4f} ({record['images']} images, "
                        f"{record['seconds']:.1f} s)")
        if onnx_path == variant_path and not keep_file:  # not a file make() was given
            variant_path.unlink(missing_ok=True)
        return record


def _open(path: Path) -> Any:
    from harness.backends.onnxruntime_backend import OnnxruntimeBackend

    backend = OnnxruntimeBackend(path, provider="cpu")
    backend.load()
    return backend
