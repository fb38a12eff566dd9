"""ΔAP split into its causes: what the numbers cost and what the NMS cost.

For a row whose file ends in its own NMS (an end2end ONNX on onnxruntime: ONNX
NonMaxSuppression, a TensorRT NMS plugin emulated), the pass also sends the file's own NMS
candidates (the NMS node's inputs, harness.align.file_pipelines) through the reference's NMS
(the model source's, with the row's settings): `AP_reference_nms`. Then, against PyTorch fp32
at the same batch,

    numeric = AP_reference_nms − AP_reference      (the candidates' numbers)
    nms     = AP − AP_reference_nms                (the file's NMS: TopK, thresholds, ties,
                                                    caps)

which add up to ΔAP exactly. A row whose NMS is the reference's (raw / decoded outputs, the
harness runs the source's NMS) has nms = 0 by construction. A TensorRT end2end engine keeps
its candidates inside: they are read from a debug engine built from its source ONNX with
its own settings, marking only the NMS inputs (as `harness compare` does); since
marking may change the numbers a little, each image's candidates are also replayed through
the file's own NMS and checked against the engine's detections, and the row says on how many
images that replay did not reproduce them.

The NMS part is split further by mismatch cause: both NMS are replayed in trace mode on the
file's candidates and diffed as `harness compare` diffs them (harness.align.detections), each
stored detection labelled with the cause of its mismatch (none when matched); then for each
cause, AP with that cause's detections restored to the reference's (its target detections
removed, its reference-NMS detections added):

    nms_by_cause[c] = AP − AP(restored c)        (what cause c cost)

Causes interact a little (a restored box may suppress or be matched differently), so they
sum to the NMS part up to `unattributed`, which the report shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np


@dataclass
class ReferenceNms:
    """One image's candidates through the reference's NMS (`result`), and the cause of each
    mismatch between it and the file's own NMS, by (candidate row, class) on each side."""

    result: Any
    target_causes: dict[tuple[int, int], str] = field(default_factory=dict)
    reference_causes: dict[tuple[int, int], str] = field(default_factory=dict)
    # the candidates through the file's own NMS reproduce the row's detections (None: not
    # checked)
    replay_agrees: Optional[bool] = None


def causes_by_candidate(mismatches: Sequence[Any]) -> tuple[dict, dict]:
    """(target, reference) maps (candidate row, class) → cause of DetectionDiff mismatches;
    a matched pair beyond tolerance is labelled on both sides."""
    target: dict[tuple[int, int], str] = {}
    reference: dict[tuple[int, int], str] = {}
    for m in mismatches:
        if m.side in ("reference", "both"):
            reference[(int(m.box), int(m.cls))] = m.cause
        if m.side == "target":
            target[(int(m.box), int(m.cls))] = m.cause
        elif m.side == "both":
            other = m.box if m.target_box is None else m.target_box
            target[(int(other), int(m.cls))] = m.cause
    return target, reference


def entry_causes(det: Any, causes: Mapping[tuple[int, int], str],
                 category_ids: Sequence[int]) -> list[Optional[str]]:
    """Per COCO entry of `det` (coco_pass.coco_entries drops classes without a category, so
    this does too), its mismatch cause or None."""
    return [causes.get((int(b), int(k))) for b, k in zip(det.box_index, det.labels)
            if category_ids[int(k)] >= 0]


def restored(records: Mapping[int, Mapping[str, Any]], image_ids: Sequence[int],
             cause: str) -> list[dict]:
    """COCO entries of `image_ids` with `cause`'s detections restored to the reference's."""
    out: list[dict] = []
    for i in image_ids:
        rec = records[i]
        causes = rec.get("nms_causes") or {}
        mine, theirs = causes.get("detections"), causes.get("reference_nms")
        dets, refs = rec.get("detections") or [], rec.get("reference_nms") or []
        if mine is None or theirs is None:
            out += dets
            continue
        out += [e for e, c in zip(dets, mine) if c != cause]
        out += [e for e, c in zip(refs, theirs) if c == cause]
    return out


def cause_scores(coco: Any, records: Mapping[int, Mapping[str, Any]], image_ids: Sequence[int],
                 class_names: Mapping[int, str], evaluator: str) -> Optional[dict[str, Any]]:
    """{cause: {"detections": mismatched detections of the cause (both sides), "AP_restored"}}
    for every cause the stored `nms_causes` name; None when none were stored."""
    from harness.eval.coco_scores import evaluate

    counts: dict[str, int] = {}
    stored = False
    for i in image_ids:
        causes = records[i].get("nms_causes")
        if causes is None:
            continue
        stored = True
        for c in (causes.get("detections") or []) + (causes.get("reference_nms") or []):
            if c:
                counts[c] = counts.get(c, 0) + 1
    if not stored:
        return None
    return {c: {"detections": n, "AP_restored": evaluate(
        coco, restored(records, image_ids, c), image_ids, class_names, evaluator).stats["AP"]}
        for c, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def reference_nms_post(model: Any, backend: Any, work_dir: Optional[Any] = None,
                       nms_inputs_backend: Optional[Callable[..., Any]] = None
                       ) -> tuple[Optional[Callable[..., list]],
                                  str]:
    """(post_reference for coco_pass.run_pass or None, how the row's ΔAP will be split).

    work_dir: where a TensorRT end2end engine's debug engine is built (cached); without it
    such a row is not split. nms_inputs_backend(backend, onnx_path, proto, pipeline,
    work_dir): what reads its candidates (default: nms_inputs_engine)."""
    import contextlib
    import threading

    import onnx

    from harness.align.detections import DetectionDiff
    from harness.align.pipelines import Candidates, SourcePipeline, pipeline_for
    from harness.export.outputs import detections_from_outputs
    from harness.models.source import DecodedCandidates

    same = "its NMS is the reference's (the harness runs it on the outputs)"
    if getattr(backend, "name", "") == "torch":
        return None, same
    path = backend.source_onnx() if hasattr(backend, "source_onnx") else None
    if path is None:
        return None, "not split: no ONNX graph names this row's NMS candidates"
    proto = onnx.load(str(path), load_external_data=False)
    if getattr(model, "rpn", None) is not None:  # two-stage: its raw file's NMS is ours
        end2end = model.output_variant([o.name for o in proto.graph.output]) == "end2end"
        return None, ("not split: a two-stage end2end file (compare splits its causes)"
                      if end2end else same)
    from harness.errors import UserError

    try:
        pipeline = pipeline_for(model, proto)
    except UserError as exc:
        return None, f"not split: {exc}"
    if isinstance(pipeline, SourcePipeline):
        return None, same
    reader, guard, via = backend, contextlib.nullcontext(), ""
    if getattr(backend, "name", "") != "onnxruntime":
        if getattr(backend, "name", "") != "tensorrt" or work_dir is None:
            return None, "not split: its NMS candidates cannot be read from this backend"
        try:
            reader = (nms_inputs_backend or nms_inputs_engine)(backend, path, proto, pipeline,
                                                               work_dir)
        except UserError as exc:
            return None, f"not split: {exc}"
        # one execution context: the pass's post-processing threads take turns
        guard, via = threading.Lock(), ", read by a debug engine marking them"

    reference = SourcePipeline(model)

    def post(outputs: Any, metas: Sequence[Any], inputs: np.ndarray,
             detections: Optional[Sequence[Any]] = None) -> list:
        """detections: the row's, as the pass post-processed them (else made here)."""
        with guard:
            cands = pipeline.candidates(outputs, reader, inputs)
        decoded = DecodedCandidates(boxes=cands.boxes, scores=cands.scores, objectness=None)
        theirs = reference.replay(Candidates(cands.boxes, cands.scores, decoded=decoded), metas)
        actual = detections if detections is not None else \
            detections_from_outputs(model, outputs, metas)
        out = []
        for meta, ref, own, act in zip(metas, theirs, pipeline.replay(cands, metas), actual):
            found = DetectionDiff().add_image(str(getattr(meta, "path", "")), ref, own)
            target, reference_side = causes_by_candidate(found)
            agrees = len(own.result) == len(act) and bool(np.allclose(
                np.asarray(own.result.boxes), np.asarray(act.boxes), atol=1e-3))
            out.append(ReferenceNms(ref.result, target, reference_side, agrees))
        return out

    return post, ("its own candidates through the reference's NMS "
                  f"({pipeline.describe().get('kind')} in the file{via})")


def nms_inputs_engine(backend: Any, onnx_path: Any, proto: Any, pipeline: Any,
                      work_dir: Any) -> Any:
    """What reads a TensorRT end2end engine's NMS candidates: debug engines (built once,
    cached in `work_dir`) from its source ONNX with the engine's own settings, marking only
    the NMS inputs, as `harness compare` plans them (tensorrt_marking.split_marking: a
    plugin's two inputs in an engine of their own; an ONNX NonMaxSuppression's inputs as
    layers). A UserError when they cannot be built (settings unknown, nothing to mark)."""
    from harness.align.compare import producers
    from harness.backends.tensorrt_marking import ChunkedDebugEngines, split_marking
    from harness.errors import UserError

    made_by = producers(proto, pipeline.inputs)
    if not made_by:
        raise UserError("its NMS inputs are not made by a node a debug engine can mark")
    layers, nms_inputs = split_marking(list(proto.graph.node), made_by)
    engines = ChunkedDebugEngines(backend, onnx_path, layers, nms_inputs, work_dir,
                                  settings=backend.debug_build())
    engines.load()
    return engines


def replay_disagreements(records: Mapping[int, Mapping[str, Any]],
                         image_ids: Sequence[int]) -> int:
    """Images whose candidates, through the file's own NMS, did not give their stored
    detections (coco_pass.reference_records' `reference_replay_agrees`)."""
    return sum(1 for i in image_ids if records[i].get("reference_replay_agrees") is False)


def split(row: Any, reference: Any) -> Optional[dict[str, Any]]:
    """The parts of row.delta_AP against `reference` (a CocoRow), or None; per COCO size range
    and per class too where the reference-NMS figures were kept (delta_AP_parts
    ["reference_nms"]). A class or size with no ground truth (AP -1 or None) is left out."""
    if row.delta_AP is None or row.AP_reference_nms is None:
        return None
    numeric = row.AP_reference_nms - reference.AP
    nms = row.AP - row.AP_reference_nms
    out: dict[str, Any] = {"numeric": numeric, "nms": nms, "sum": numeric + nms}
    through = (row.delta_AP_parts or {}).get("reference_nms")
    if through:
        out["sizes"] = {k: _parts(getattr(row, k), through["sizes"].get(k),
                                  getattr(reference, k))
                        for k in through["sizes"]}
        mine, ref = row.per_class or {}, reference.per_class or {}
        out["per_class"] = {c: _parts(mine.get(c), v, ref.get(c))
                            for c, v in (through.get("per_class") or {}).items()}
        out["sizes"] = {k: v for k, v in out["sizes"].items() if v}
        out["per_class"] = {k: v for k, v in out["per_class"].items() if v}
    causes = (row.delta_AP_parts or {}).get("nms_causes")
    if causes:
        out["nms_by_cause"] = {c: row.AP - v["AP_restored"] for c, v in causes.items()}
        out["nms_unattributed"] = nms - sum(out["nms_by_cause"].values())
    return out


def _parts(ap: Optional[float], through: Optional[float],
           ref: Optional[float]) -> Optional[dict[str, float]]:
    if any(v is None or v < 0 for v in (ap, through, ref)):
        return None
    return {"numeric": through - ref, "nms": ap - through}
