"""The one-sentence verdict of a compare run over all its targets: what matched, what differed
and why (with the layer where the numbers part, how the proposals compare, ties, the NMS
settings that differ), what could not be compared, batch invariance, and what the reference
itself could not promise. Every clause is read from a measured result."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from harness.results import DetectionSummary, TargetResult, Unreadable


def _layer_words(t: TargetResult) -> str:
    layers = t.layers
    past = layers.first_past_tolerance if layers else None
    words = (f"first past its {t.precision} tolerance at {past.module} "
             f"(rel-L2 {past.rel_l2:.2g} > {past.tolerance:g})") if past else (
        f"no layer past its {t.precision} tolerance" if layers and layers.rows else
        "layers not compared")
    bad = layers.first_nonfinite if layers else None
    if bad:
        words += (f"; inf/NaN first at {bad.module} ({bad.target} values in the target, "
                  f"{bad.reference} in PyTorch; {layers.layers_with_nonfinite} layers "
                  "with inf/NaN)")
    return words


def _proposal_words(t: TargetResult) -> str:
    """Two-stage: how the target's proposals compare with PyTorch's, and why they differ."""
    p = t.proposals
    if not p:
        return ""

    def causes(d: dict[str, int]) -> str:
        return ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in
                         sorted(d.items(), key=lambda kv: -kv[1]))

    words = (f"; proposals: {p['matched']} of PyTorch's {p['reference']} in the target "
             f"({p['identical']} identical)")
    lost, extra = sum(p["missing_on_target"].values()), sum(p["missing_on_reference"].values())
    if lost:
        words += f", {lost} missing ({causes(p['missing_on_target'])})"
    if extra:
        words += f", {extra} only in the target ({causes(p['missing_on_reference'])})"
    return words


def _tie_words(det: DetectionSummary) -> str:
    ties = det.ties or {}
    if not (ties.get("reference") or ties.get("target")):
        return ""
    return (f"; {ties['reference']} PyTorch and {ties['target']} target detections sit in "
            "tie groups (equal scores: an order no runtime promises decides them)")


def _settings_words(det: DetectionSummary) -> str:
    parts = [f"{d.label} {d.target} vs {d.reference} ({d.explains} detections)"
             for d in det.settings_differ]
    return f"; NMS settings differ: {', '.join(parts)}" if parts else ""


def verdict(targets: Sequence[TargetResult], replay_check: Optional[dict[str, int]] = None,
            unreadable: Sequence[Unreadable] = (),
            reference_invariance: Optional[dict[str, Any]] = None) -> str:
    """One sentence over all targets: what matched, what differed and why, what could not be
    compared, and what the reference itself could not promise."""
    parts = []
    for t in targets:
        if not t.available or t.detections is None:
            # "could not be compared: …" reads as it is; "not available …" after "was"
            verb = "" if (t.reason or "").startswith("could not") else "was "
            parts.append(f"{t.name} {verb}{t.reason}")
            continue
        det = t.detections
        where = _layer_words(t) + _proposal_words(t)
        if t.candidates is not None and t.candidates.box_coding:
            where += f"; before NMS: {t.candidates.box_coding}"
        if det.settings_problem:
            parts.append(f"{t.name}: its NMS settings give no output ({det.settings_problem}"
                         f"), so {det.mismatches} PyTorch detections are missing; {where}")
            continue
        if det.reference == det.target == 0:
            parts.append(f"{t.name}: neither it nor PyTorch has any detection on these "
                         f"images, so no detection was compared; {where}")
            continue
        if det.mismatches == 0:
            parts.append(f"{t.name} matches PyTorch ({where}; all {det.reference} "
                         f"detections agree{_tie_words(det)}{_settings_words(det)})")
            continue
        causes = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in
                           sorted(det.causes.items(), key=lambda kv: -kv[1]) if n)
        parts.append(f"{t.name} differs from PyTorch in {det.mismatches} detections "
                     f"({causes}); {where}{_tie_words(det)}{_settings_words(det)}")
    from harness.align.batch_invariance import words as invariance_words

    for name, doc in [("PyTorch", reference_invariance),
                      *((t.name, t.batch_invariance) for t in targets if t.available)]:
        said = invariance_words(name, doc)
        if said:
            parts.append(said)
    if replay_check and (replay_check["differ_outside_ties"] or
                         replay_check["not_found_in_candidates"]):
        parts.append(f"warning: the harness's replay of mmyolo's NMS differs from mmyolo's own "
                     f"output in {replay_check['differ_outside_ties']} detections outside tie "
                     f"groups and {replay_check['not_found_in_candidates']} of mmyolo's "
                     "detections are not among the decoded candidates, so explanations of "
                     "those may be wrong")
    if unreadable:
        parts.append(f"{len(unreadable)} unreadable images skipped "
                     f"({', '.join(Path(u.image).name for u in unreadable[:5])}"
                     f"{', …' if len(unreadable) > 5 else ''})")
    return "; ".join(parts) + "." if parts else "no targets."
