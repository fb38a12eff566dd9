"""What each gate reads from the results: one function per gate kind, taking a coco row or a
compare target and returning (value, detail) or raising harness.results.Missing naming the
field it lacks; and the table of gates by the name used in `[gates]`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.results import CocoRow, Missing, TargetResult


@dataclass(frozen=True)
class GateSpec:
    """What a gate measures: which results section, which direction, how to read one value."""
    section: str                # "coco" or "compare"
    bound: str                  # "max": value <= limit; "min": value >= limit
    quantity: str               # what the value is, in words
    value: Callable[[Any, Any, Any], tuple[float, str]]  # (entry, Gate, Baselines)


# -- configurations: coco rows and compare targets

def _coco_id(row: CocoRow) -> str:
    return f"{row.backend}-{row.device}-{row.precision}-b{row.batch}"


def _coco_words(row: CocoRow) -> str:
    return (f"backend {row.backend}, device {row.device}, precision {row.precision}, "
            f"batch {row.batch}")


def _target_id(target: TargetResult, index: int) -> str:
    return target.name or os.path.basename(target.path or "") or f"target{index}"


def _target_words(target: TargetResult) -> str:
    words = [f"{target.path or target.name}"]
    for key in ("kind", "precision", "variant"):
        if getattr(target, key) is not None:
            words.append(f"{key} {getattr(target, key)}")
    if target.pipeline and target.pipeline.get("kind"):
        words.append(f"nms {target.pipeline['kind']}")
    return ", ".join(words)


# -- the value each gate reads; harness.results.Missing (naming the field) where the results
# hold no number, which fails the gate

def _delta_ap(row: CocoRow, gate: Any, baselines: Any):
    if row.delta_AP is None and "delta_AP" not in row._missing:
        raise Missing(f"{row._path}.delta_AP", "null (no PyTorch fp32 row of the same batch "
                                              "to compare with: add torch fp32 to the matrix)")
    delta = row.need("delta_AP")
    detail = f"AP {_num(row.AP)}, ΔAP {_num(delta, signed=True)} vs PyTorch fp32"
    return abs(float(delta)), detail


def _ap(row: CocoRow, gate: Any, baselines: Any):
    return float(row.need("AP")), ""


def _worst_layer(target: TargetResult, gate: Any, baselines: Any):
    layers = target.need("layers")
    rows = layers.need("rows")
    if not rows:
        raise Missing(f"{layers._path}.rows", f"empty ({layers.note or 'no layer compared'})")
    worst = max(rows, key=lambda r: float(r.need("rel_l2")))
    detail = f"worst layer: {worst.module} ({worst.tensor})"
    first = layers.first_divergence
    if first:
        detail += (f"; numbers start to differ (rel-L2 > {_num(first.tolerance)}) at "
                   f"{first.module} (rel-L2 {_num(first.rel_l2)})")
    past = layers.first_past_tolerance
    if past:
        detail += (f"; first past its precision's tolerance {_num(past.tolerance)}: "
                   f"{past.module} (rel-L2 {_num(past.rel_l2)})")
    return float(worst.rel_l2), detail


def _match_rate(target: TargetResult, gate: Any, baselines: Any):
    det = target.need("detections")
    rate = det.need("match_rate")
    detail = (f"matched {det.matched} of {det.reference} reference detections "
              f"({det.target} from the target)")
    return float(rate), detail


def _unexplained(target: TargetResult, gate: Any, baselines: Any):
    det = target.need("detections")
    unexplained = det.need("unexplained")
    examples = [e for e in det.examples if e.cause == "unexplained"][:3]
    causes = ", ".join(f"{cause} {n}" for cause, n in (det.causes or {}).items() if n)
    detail = f"{det.mismatches} mismatches ({causes or 'no causes recorded'})"
    for e in examples:
        detail += (f"\n  e.g. {e.image}: {e.side} {e.class_name} score {_num(e.score)} "
                   f"{e.detail or ''}".rstrip())
    return float(unexplained), detail


def _batch_variant(target: TargetResult, gate: Any, baselines: Any):
    doc = target.batch_invariance
    if doc is None:
        raise Missing(f"{target._path}.batch_invariance",
                      "null (compare ran at batch 1, or with --no-batch-invariance)")
    if doc.get("note"):
        raise Missing(f"{target._path}.batch_invariance", doc["note"])
    causes = ", ".join(f"{c} {n}" for c, n in doc["causes"].items()) or "none"
    padded = (doc.get("padded") or {}).get("changed_images", 0)
    detail = (f"{doc['changed_images']} of {doc['images']} images change between batch 1 and "
              f"batch {doc['batch']} ({doc['detections_changed']} detections; causes {causes}; "
              f"scores up to {_num(doc['max_score_change'])}, boxes up to "
              f"{_num(doc['max_box_change_px'])} px); {padded} beside padding images")
    return float(max(doc["changed_images"], padded)), detail


def _total_mean(row: CocoRow, where: str) -> float:
    latency = row.need("latency_ms")
    mean = (latency.get("total") or {}).get("mean")
    if mean is None:
        raise Missing(f"{where}.latency_ms.total.mean")
    return float(mean)


def _latency_ratio(row: CocoRow, gate: Any, baselines: Any):
    mean = _total_mean(row, row._path)
    baseline = baselines.read(gate.baseline)
    if baseline.coco is None:
        raise Missing(f"{gate.baseline}: coco")
    matches = [r for r in baseline.coco.rows if r.key == row.key]
    if not matches:
        raise Missing(f"{gate.baseline}: coco row {_coco_id(row)}")
    base = matches[0]
    if not base.ok:
        raise Missing(f"{gate.baseline}: {base._path}", f"not run ({base.status})")
    base_mean = _total_mean(base, f"{gate.baseline}: {base._path}")
    if not base_mean:
        raise Missing(f"{gate.baseline}: {base._path}.latency_ms.total.mean", "0")
    detail = (f"total latency {_num(mean)} ms vs {_num(base_mean)} ms in the baseline "
              f"{gate.baseline} (open {Path(gate.baseline).parent / 'coco.md'})")
    return mean / base_mean, detail


# The gates, by the name used in [gates]; order is the order of this table.
GATES: dict[str, GateSpec] = {
    "max_delta_ap": GateSpec("coco", "max", "|ΔAP vs PyTorch fp32|", _delta_ap),
    "min_ap": GateSpec("coco", "min", "AP", _ap),
    "max_layer_rel_l2": GateSpec("compare", "max", "worst layer rel-L2", _worst_layer),
    "min_match_rate": GateSpec("compare", "min", "post-NMS match rate", _match_rate),
    "max_unexplained": GateSpec("compare", "max", "unexplained detection mismatches",
                                _unexplained),
    "max_latency_ratio": GateSpec("coco", "max", "latency ratio to baseline", _latency_ratio),
    "max_batch_variant": GateSpec("compare", "max",
                                  "images whose detections change between batch 1 and N",
                                  _batch_variant),
}


def _num(value: Any, signed: bool = False) -> str:
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if float(value).is_integer() and abs(value) < 1e6:
            text = str(int(value))
        else:
            text = f"{value:.4g}"
        return f"+{text}" if signed and value >= 0 else text
    return str(value)
