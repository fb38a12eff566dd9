"""The compare run: the same preprocessed batches through PyTorch (the reference) and every
target, then per target the layer diff, the candidates before NMS, and the post-NMS diff with
a cause for every mismatch. Returns the `compare` section of results.json
(docs/results-schema.md); rendering is harness.report's business.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from harness.align.detections import DetectionDiff, Tolerances
from harness.align.layers import LayerDiff, layers_for
from harness.align.pipelines import Candidates, MmyoloPipeline, PluginPipeline, pipeline_for
from harness.align.targets import Target, layer_backend
from harness.align.tensor_diff import DiffAccumulator, relative_l2

# candidates this close count as the same set: a difference was then born in NMS
SAME_CANDIDATES = {"box_max_abs": 1e-2, "score_max_abs": 1e-4}


@dataclass
class CandidateDiff:
    """Boxes and scores before NMS, target against reference, over all images."""

    score_thr: float
    boxes: DiffAccumulator = field(default_factory=DiffAccumulator)
    scores: DiffAccumulator = field(default_factory=DiffAccumulator)
    above_ref: int = 0
    above_tgt: int = 0
    note: Optional[str] = None

    def add(self, ref: Candidates, tgt: Candidates) -> None:
        if ref.boxes.shape != tgt.boxes.shape or ref.scores.shape != tgt.scores.shape:
            self.note = (f"candidate shapes differ: reference {list(ref.scores.shape)}, "
                         f"target {list(tgt.scores.shape)}")
            return
        self.boxes.add(tgt.boxes, ref.boxes)
        self.scores.add(tgt.scores, ref.scores)
        self.above_ref += int(np.count_nonzero(ref.scores > self.score_thr))
        self.above_tgt += int(np.count_nonzero(tgt.scores > self.score_thr))

    def result(self, mismatches: int) -> dict[str, Any]:
        if self.note:
            return {"note": self.note, "born": "unknown"}
        b, s = self.boxes.summary(), self.scores.summary()
        same = b["max_abs"] <= SAME_CANDIDATES["box_max_abs"] and \
            s["max_abs"] <= SAME_CANDIDATES["score_max_abs"]
        born = "none" if not mismatches else ("in_nms" if same else "before_nms")
        return {"box_max_abs": b["max_abs"], "box_rel_l2": b["rel_l2"],
                "score_max_abs": s["max_abs"], "score_rel_l2": s["rel_l2"],
                "score_threshold": self.score_thr, "above_threshold_reference": self.above_ref,
                "above_threshold_target": self.above_tgt, "born": born}


class TargetRun:
    """Everything accumulated for one available target."""

    def __init__(self, model: Any, target: Target, layer_patterns: Sequence[str],
                 with_layers: bool, tol: Tolerances, work_dir: Path):
        import onnx

        self.target = target
        self.model = model
        proto = onnx.load(str(target.onnx_path), load_external_data=False) \
            if target.onnx_path else None
        self.pipeline = pipeline_for(model, proto) if proto is not None \
            else MmyoloPipeline(model)
        self.detections = DetectionDiff(tol)
        self.candidates = CandidateDiff(model.nms.score_thr)
        self.replay_disagrees = 0
        self.marking: Optional[float] = None
        self.layer_note: Optional[str] = None
        self.layers: Optional[LayerDiff] = None
        self.unmapped: list[str] = []
        self.layer_backend: Any = None
        layers: list[Any] = []
        if with_layers and proto is not None:
            layers, self.unmapped = layers_for(model, list(proto.graph.node), layer_patterns)
        elif with_layers:
            self.layer_note = "layer diff not available: no ONNX graph names this target's layers"
        # an engine keeps its NMS plugin's inputs inside: the debug engine marks them too
        plugin_nodes = _producers(proto, self.pipeline.inputs[:2]) \
            if target.kind == "engine" and isinstance(self.pipeline, PluginPipeline) else []
        if layers or plugin_nodes:
            from harness.errors import UserError

            try:
                self.layer_backend = layer_backend(
                    target, [lay.node for lay in layers] + plugin_nodes, work_dir)
                if layers:
                    self.layers = LayerDiff(layers)
            except UserError as exc:
                self.layer_note = f"layer diff not available: {exc}"
        # where the NMS candidates are read: the target itself, or its debug engine
        self.candidate_backend = self.layer_backend if plugin_nodes else target.backend

    def add_batch(self, reference: Any, ref_replays: list[Any], ref_cands: Candidates,
                  batch: Any) -> None:
        from harness.export.outputs import detections_from_outputs

        backend = self.target.backend
        outputs = backend.infer(batch.inputs)
        if self.candidate_backend is None:
            from harness.errors import UserError

            raise UserError(f"{self.target.name}: {self.layer_note}; its NMS inputs cannot be "
                            "read without a debug engine")
        cands = self.pipeline.candidates(outputs, self.candidate_backend, batch.inputs)
        replays = self.pipeline.replay(cands, batch.metas)
        if not isinstance(self.pipeline, MmyoloPipeline):
            # the backend ran its own NMS: check the replay reproduces it (for raw / decoded
            # outputs the harness's NMS *is* the replay)
            actual = detections_from_outputs(self.model, outputs, batch.metas)
            for rep, act in zip(replays, actual):
                same = len(rep.result) == len(act) and np.allclose(
                    rep.result.boxes, act.boxes, atol=1e-3)
                self.replay_disagrees += int(not same)
        self.candidates.add(ref_cands, cands)
        for meta, ref, tgt in zip(batch.metas, ref_replays, replays):
            self.detections.add_image(Path(meta.path).name, ref, tgt)
        if self.layers is not None:
            self.layers.add_batch(reference, self.layer_backend, batch.inputs)
            if self.layer_backend is not backend and self.marking is None:
                marked = self.layer_backend.infer(batch.inputs)
                self.marking = max(relative_l2(marked[k], v) for k, v in outputs.items()
                                   if k in marked and np.issubdtype(v.dtype, np.floating))

    def result(self, class_names: Sequence[str]) -> dict[str, Any]:
        det = self.detections.summary(class_names)
        doc: dict[str, Any] = {
            "pipeline": self.pipeline.describe(), "detections": det,
            "candidates": self.candidates.result(det["mismatches"]),
            "replay_disagrees": self.replay_disagrees,
        }
        if self.layers is not None:
            doc["layers"] = self.layers.result(self.target.precision)
            doc["layers"]["unmapped"] = self.unmapped
            doc["layers"]["marking_changed_outputs_rel_l2"] = self.marking
        else:
            doc["layers"] = {"note": self.layer_note, "rows": []}
        return doc


class _LastChunk:
    """The reference's intermediates, kept for the last chunk of layers asked for in the
    current batch: every target asking for the same layers gets them from one forward pass
    (targets of one model share their layer list), and only one chunk is alive at a time."""

    def __init__(self, backend: Any):
        self.backend = backend
        self._key: Optional[tuple[str, ...]] = None
        self._values: dict[str, np.ndarray] = {}

    def new_batch(self) -> None:
        self._key, self._values = None, {}

    def intermediates(self, inputs: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        if tuple(names) != self._key:
            self._values = {}  # free the previous chunk before computing the next
            self._values = self.backend.intermediates(inputs, names)
            self._key = tuple(names)
        return self._values


def _producers(proto: Any, tensors: Sequence[str]) -> list[str]:
    """Names of the nodes that produce `tensors` (what the debug engine marks)."""
    made_by = {out: node.name for node in proto.graph.node for out in node.output}
    return [made_by[t] for t in tensors if t in made_by]


def run_compare(model: Any, targets: Sequence[Target], images: Sequence[Path], batch: int = 4,
                layer_patterns: Sequence[str] = (), with_layers: bool = True,
                tol: Tolerances = Tolerances(), work_dir: Path = Path("."),
                progress: bool = True) -> dict[str, Any]:
    """The compare section for `targets` against PyTorch on `images`."""
    from tqdm import tqdm

    from harness.backends.torch_backend import TorchBackend
    from harness.data.preprocess import preprocess_files

    started = time.perf_counter()
    reference = TorchBackend(model, device=str(model.device), outputs="decoded")
    reference.load()
    ref_layers = _LastChunk(reference)
    ref_pipeline = MmyoloPipeline(model)
    runs = [TargetRun(model, t, layer_patterns, with_layers, tol, work_dir)
            for t in targets if t.available]
    digests = []
    chunks = [list(images[i:i + batch]) for i in range(0, len(images), batch)]
    for paths in tqdm(chunks, desc="compare", unit="batch", disable=not progress):
        data = preprocess_files(paths, model.preprocess)
        digests.append(data.sha256)
        ref_out = reference.infer(data.inputs)
        ref_cands = ref_pipeline.candidates(ref_out, reference, data.inputs)
        ref_replays = ref_pipeline.replay(ref_cands, data.metas)
        ref_layers.new_batch()
        for run in runs:
            run.add_batch(ref_layers, ref_replays, ref_cands, data)

    by_path = {id(r.target): r for r in runs}
    docs = []
    for t in targets:
        doc: dict[str, Any] = {"name": t.name, "path": str(t.path), "kind": t.kind,
                               "available": t.available, "reason": t.reason,
                               "precision": t.precision, "backend": t.info}
        doc["variant"] = (t.info or {}).get("variant")
        if t.available:
            doc.update(by_path[id(t)].result(model.class_names))
        docs.append(doc)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "model": model.describe(),
        "inputs": {"images": [str(p) for p in images], "count": len(images), "batch": batch,
                   "sha256": digests, "preprocess": model.preprocess.describe(),
                   "note": "every backend received these exact bytes"},
        "reference": {**reference.describe(), "pipeline": ref_pipeline.describe()},
        "targets": docs,
        "verdict": verdict(docs),
    }


def verdict(targets: Sequence[dict[str, Any]]) -> str:
    """One sentence over all targets."""
    parts = []
    for t in targets:
        if not t["available"]:
            parts.append(f"{t['name']} was {t['reason']}")
            continue
        det = t["detections"]
        layers = t.get("layers") or {}
        past = layers.get("first_past_tolerance")
        where = (f"first past its {t['precision']} tolerance at {past['module']} "
                 f"(rel-L2 {past['rel_l2']:.2g})") if past else (
            f"no layer past its {t['precision']} tolerance" if layers.get("rows") else
            "layers not compared")
        if det["mismatches"] == 0:
            parts.append(f"{t['name']} matches PyTorch ({where}; all {det['reference']} "
                         "detections agree)")
            continue
        causes = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in
                           sorted(det["causes"].items(), key=lambda kv: -kv[1]) if n)
        parts.append(f"{t['name']} differs from PyTorch in {det['mismatches']} detections "
                     f"({causes}); {where}")
    return "; ".join(parts) + "." if parts else "no targets."
