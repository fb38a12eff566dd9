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
harness runs the source's NMS) has nms = 0 by construction. Rows whose candidates cannot be
read without a debug engine (TensorRT) are not split.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np


def reference_nms_post(model: Any, backend: Any
                       ) -> tuple[Optional[Callable[[Any, Sequence[Any], np.ndarray], list]],
                                  str]:
    """(post_reference for coco_pass.run_pass or None, how the row's ΔAP will be split)."""
    import onnx

    from harness.align.pipelines import SourcePipeline, pipeline_for
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
    if getattr(backend, "name", "") != "onnxruntime":
        return None, ("not split: its NMS candidates are read from the engine's source ONNX "
                      "only through a debug engine (harness compare does that)")

    def post(outputs: Any, metas: Sequence[Any], inputs: np.ndarray) -> list:
        cands = pipeline.candidates(outputs, backend, inputs)
        decoded = DecodedCandidates(boxes=cands.boxes, scores=cands.scores, objectness=None)
        return model.detections(decoded, metas)

    return post, ("its own candidates through the reference's NMS "
                  f"({pipeline.describe().get('kind')} in the file)")


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
    return out


def _parts(ap: Optional[float], through: Optional[float],
           ref: Optional[float]) -> Optional[dict[str, float]]:
    if any(v is None or v < 0 for v in (ap, through, ref)):
        return None
    return {"numeric": through - ref, "nms": ap - through}
