"""`compare.md` (and `layers.png`) from the `compare` section of results.json, top-down:
inputs, backends, verdict, layers and first divergence, detection causes, examples."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from harness.align.detections import CAUSES
from harness.backends.registry import label
from harness.report.markdown import fmt, table
from harness.results import (
    CompareResult, ExperimentSection, LayerSummary, TargetResult, atomic_write_text,
    write_section,
)

LAYER_ROWS_SHOWN = 80


def write_compare_report(doc: CompareResult, out: Path,
                         experiment: Optional[ExperimentSection] = None) -> list[Path]:
    """Write results.json (compare section, and the experiment's section when run from one)
    first, then the plot and compare.md from it."""
    from harness.report.layer_plot import plot_layer_errors

    results = write_section(out, "compare", doc, experiment)
    written = [results]
    plot = out / "layers.png"
    if plot_layer_errors(doc, plot):
        written.append(plot)
    md = out / "compare.md"
    atomic_write_text(md, render_compare(doc, plot.name if plot in written else None))
    written.append(md)
    return written


def _short(digest: str) -> str:
    return digest[:12] + "…"


def render_compare(doc: CompareResult, plot: Optional[str] = None) -> str:
    out = [f"# compare: {Path(doc.model['config']).name} — PyTorch vs "
           f"{', '.join(t.name for t in doc.targets)}", ""]
    out += _inputs(doc)
    out += _backends(doc)
    out += ["## Verdict", "", f"**Verdict:** {doc.verdict}", ""]
    out += _layers(doc, plot)
    out += _detections(doc)
    out += _proposals(doc)
    out += _batch_invariance(doc)
    out += _candidates(doc)
    out += _topk_pressure(doc)
    out += _preflight(doc)
    out += _examples(doc)
    out += [f"_{doc.created}, {doc.seconds} s._", ""]
    return "\n".join(out)


def _inputs(doc: CompareResult) -> list[str]:
    inputs = doc.inputs
    out = ["## Inputs", "",
           f"{inputs.count} images in batches of {inputs.batch}; every backend got the "
           f"same bytes (sha256 per batch: {', '.join(_short(d) for d in inputs.sha256[:4])}"
           f"{', …' if len(inputs.sha256) > 4 else ''}).", ""]
    if inputs.unreadable:
        out += [f"**{len(inputs.unreadable)} unreadable images skipped** (of "
                f"{inputs.requested or inputs.count} asked for):", ""]
        out += [f"- {Path(u.image).name}: {u.reason}" for u in inputs.unreadable]
        out += [""]
    if inputs.preprocess:
        out += [table(["preprocessing", "value"],
                      [[k, str(v)] for k, v in inputs.preprocess.items()], align="ll"), ""]
    return out


def _backends(doc: CompareResult) -> list[str]:
    ref = doc.reference
    rows = [["PyTorch (reference)", "torch " + str(ref.get("torch")), ref.get("device"),
             ref.get("precision"), "—", _pipeline(ref.get("pipeline")), "yes"]]
    for t in doc.targets:
        b = t.backend
        name = b.get("backend")  # describe() of the backend that ran it
        runtime = f"{label(name)} {b.get(name) or ''}".strip() if name else t.kind
        rows.append([t.name, runtime, b.get("provider") or b.get("device") or "—",
                     t.precision, t.variant or "—",
                     _pipeline(t.pipeline) if t.available else "—",
                     "yes" if t.available else t.reason])
    return ["## Backends", "",
            table(["backend", "runtime", "device", "precision", "variant", "NMS", "available"],
                  rows, align="lllllll"), ""]


def _layers(doc: CompareResult, plot: Optional[str]) -> list[str]:
    out = ["## Layers", ""]
    if plot:
        out += [f"![relative L2 error along network depth]({plot})", ""]
    summary = []
    for t in doc.targets:
        lay = t.layers
        if not t.available or lay is None or not lay.rows:
            summary.append([t.name, 0, "—", "—", "—", "—",
                            (t.reason if not t.available else lay and lay.note) or "—"])
            continue
        first, past = lay.first_divergence, lay.first_past_tolerance
        worst = lay.worst[0] if lay.worst else None
        summary.append([
            t.name, len(lay.rows),
            f"{first.module} ({fmt(first.rel_l2)})" if first else "none",
            f"{past.module} ({fmt(past.rel_l2)} > {fmt(past.tolerance)})" if past
            else f"none (tolerance {fmt(lay.tolerance)})",
            f"{worst['module']} ({fmt(worst['rel_l2'])})" if worst else "—",
            _nonfinite_cell(lay), _layer_notes(lay)])
    out += [table(["target", "layers", "numbers start to differ (rel-L2 > 1e-4)",
                   "first past its precision's tolerance", "worst layer",
                   "first inf / NaN", "notes"], summary, align="lrlllll"), ""]
    if any(t.layers is not None and t.layers.first_nonfinite for t in doc.targets):
        out += ["Layers with inf / NaN values are compared on their finite elements only: "
                "their metrics cannot vouch for them, and the first such layer is a divergence "
                "point of its own.", ""]
    for t in doc.targets:
        if t.layers is None or not t.layers.rows:
            continue
        rows = [[r.depth, r.module, r.tensor, "×".join(map(str, r.shape or [])), r.max_abs,
                 r.mean_abs, r.rel_l2, r.cosine, r.nonfinite]
                for r in t.layers.rows[:LAYER_ROWS_SHOWN]]
        out += [f"<details><summary>{t.name}: every layer ({len(t.layers.rows)})</summary>",
                "", table(["depth", "module", "tensor", "shape", "max-abs", "mean-abs",
                           "rel-L2", "cosine", "inf / NaN"], rows, align="rlllrrrrr"), "",
                "</details>", ""]
    return out


def _detections(doc: CompareResult) -> list[str]:
    check = doc.reference.get("replay_check") or {}
    own = doc.reference.get("detections") or "the framework's own"
    framework = doc.model.get("framework") or own.split(" ")[0]
    out = ["## Detections after NMS", "",
           f"PyTorch's detections are {own}. Matched: same class, IoU >= 0.5 (boxes thinner than the degenerate "
           "limit: by corner distance), greedily by score. Every mismatch has exactly one "
           "cause, read from both pipelines' NMS replayed in trace mode on their own "
           "candidates. *Tie groups*: detections an equal-scored candidate could have taken "
           "(no runtime promises an order among equal scores).", ""]
    if check:
        out += [f"Replay check: of {framework}'s {check['detections']} detections, "
                f"{check['differ_from_replay']} differ from the harness's replay of the same "
                f"NMS ({check['differ_outside_ties']} outside tie groups), "
                f"{check['not_found_in_candidates']} are not among the decoded candidates.", ""]
    rows = []
    for t in doc.targets:
        d = t.detections
        if not t.available or d is None:
            rows.append([t.name, *(["—"] * 7), *(["—"] * len(CAUSES))])
            continue
        rows.append([t.name, d.reference, d.target, d.matched, d.match_rate, d.mismatches,
                     d.ties.get("reference", "—"), d.ties.get("target", "—"),
                     *[d.causes.get(c, 0) for c in CAUSES]])
    out += [table(["target", "PyTorch", "target", "matched", "match rate", "mismatches",
                   "PyTorch in tie groups", "target in tie groups",
                   *[c.replace("_", " ") for c in CAUSES]], rows,
                  align="l" + "r" * (7 + len(CAUSES))), ""]
    for t in doc.targets:
        out += _settings(t)
        if t.available:
            out += _settings_sources(t)
    return out


def _settings(t: TargetResult) -> list[str]:
    d = t.detections
    if d is None:
        return []
    out = []
    if d.settings_problem:
        out += [f"**{t.name}: NMS settings give no output:** {d.settings_problem}.", ""]
    if d.settings_differ:
        rows = [[x.label, fmt(x.reference), fmt(x.target), x.explains]
                for x in d.settings_differ]
        out += [f"**{t.name}: NMS settings differ from PyTorch's**", "",
                table(["setting", "PyTorch", "target", "mismatches it decided"], rows,
                      align="lrrr"), ""]
    if d.degenerate_matched:
        out += [f"{t.name}: {d.degenerate_matched} pairs of degenerate boxes (width or height "
                f"< {d.tolerances.get('degenerate_px', 1):g} px) matched by corner distance.",
                ""]
    return out


def _proposals(doc: CompareResult) -> list[str]:
    """Two-stage: the proposal diff (harness.align.proposals), per target."""
    rows, notes = [], []
    for t in doc.targets:
        p = t.proposals
        if not t.available or not p:
            continue

        def causes(d: dict[str, int]) -> str:
            return ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in d.items()) or "—"

        worst = max((p.get("rpn_outputs_rel_l2") or {}).values(), default=float("nan"))
        rows.append([t.name, p["reference"], p["target"], p["matched"], p["identical"],
                     p["box_max_abs"], worst, causes(p["missing_on_target"]),
                     causes(p["missing_on_reference"]), p["not_replayed"]])
        notes += [f"- {t.name}, {e['image']}: anchor {e['anchor']} missing on "
                  f"{e['missing_on']} — {e['cause'].replace('_', ' ')}: {e['detail']}"
                  for e in p.get("examples", [])[:4]]
    if not rows:
        return []
    return ["### Proposals (the RPN's output)", "",
            "Each side's proposals linked to the RPN anchor that made them and matched across "
            "sides by anchor; a proposal one side lacks has the reason its RPN, replayed in "
            "trace mode with that side's settings, gives (per-level TopK cut, NMS scope, cap, "
            "tie). Final detections whose proposal one side lacks are counted as *proposal "
            "missing* above.", "",
            table(["target", "PyTorch", "target", "matched", "identical", "box max-abs (px)",
                   "RPN outputs rel-L2", "missing in target (why)",
                   "only in target (why PyTorch lacks it)", "not replayed"], rows,
                  align="lrrrrrrllr"), "", *notes, ""]


def _batch_invariance(doc: CompareResult) -> list[str]:
    """Each side's batch-1 runs against its batch-N ones."""
    sides = [("PyTorch", doc.reference.get("batch_invariance"))]
    sides += [(t.name, t.batch_invariance) for t in doc.targets if t.available]
    rows, notes = [], []
    for name, b in sides:
        if not b:
            continue
        causes = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in b["causes"].items())
        pad = b.get("padded") or {}
        rows.append([name, b["images"], b["changed_images"], b["detections_changed"],
                     b["max_score_change"], b["max_box_change_px"],
                     pad.get("changed_images", "—"), b.get("note") or causes or "—"])
        notes += [f"- {name}, {e['image']}: {e['cause'].replace('_', ' ')} — {e['detail']}"
                  for e in b.get("examples", [])[:3]]
    if not rows:
        return []
    batch = next(b for _, b in sides if b)["batch"]
    return [f"### Batch invariance: alone (batch 1) vs inside a batch of {batch}", "",
            "Every image run again alone on the same backend and diffed against its "
            "detections inside the batch, with the same causes as above, and against a batch "
            f"of {batch} made of it and padding images (its letterbox shape, all pad value). "
            "A deterministic backend changes nothing; kernels chosen per batch size (fp16, "
            "int8) may.", "",
            table(["side", "images", "images that change", "detections that change",
                   "largest score change", "largest box change (px)",
                   "images that change beside padding", "causes / note"], rows,
                  align="lrrrrrrl"), "", *notes, ""]


def _candidates(doc: CompareResult) -> list[str]:
    rows = []
    for t in doc.targets:
        c = t.candidates
        if not t.available or c is None:
            continue
        born = {"none": "no difference", "in_nms": "in NMS (same candidates)",
                "before_nms": "before NMS (candidates differ)"}.get(c.born, c.note or "—")
        if c.box_coding:
            born += f": {c.box_coding}"
        rows.append([t.name, c.box_max_abs, c.score_max_abs, c.score_rel_l2,
                     c.above_threshold_reference, c.above_threshold_target, born,
                     t.replay_disagrees])
    if not rows:
        return []
    return ["### Before NMS: decoded candidates", "",
            table(["target", "box max-abs (px)", "score max-abs", "score rel-L2",
                   "PyTorch above score_thr", "target above score_thr", "difference born",
                   "replay ≠ backend output (images)"], rows, align="lrrrrrlr"), ""]


def _topk_pressure(doc: CompareResult) -> list[str]:
    p = doc.reference.get("candidates_before_topk")
    if not p:
        return []
    changed = doc.model.get("nms_changed") or {}
    note = ("; the reference ran with " + ", ".join(f"{k} {v[1]} (config: {v[0]})"
                                                    for k, v in changed.items())
            if changed else "")
    rows = [[x["image"], x["candidates"], max(0, x["candidates"] - p["nms_pre"]),
             "yes" if x["candidates"] > p["tensorrt_topk_limit"] else "no"]
            for x in sorted(p["per_image"], key=lambda x: -x["candidates"])[:10]]
    return ["### Candidates before the pre-NMS TopK", "",
            f"Candidates above score_thr that the pre-NMS TopK ranks, per image: at most "
            f"{p['max']}. nms_pre {p['nms_pre']} cuts on {p['images_cut_by_nms_pre']} of "
            f"{len(p['per_image'])} images; a TopK at TensorRT's limit "
            f"({p['tensorrt_topk_limit']}) would cut on {p['images_cut_at_tensorrt_limit']}"
            f"{note}. To compare with a deployed TopK of K, run the reference with "
            "`--nms-pre K`.", "",
            table(["image", "candidates above score_thr", "cut by nms_pre",
                   f"over {p['tensorrt_topk_limit']}"], rows, align="lrrl"), ""]


def _examples(doc: CompareResult) -> list[str]:
    out = []
    for t in doc.targets:
        ex = t.detections.examples if t.detections else []
        if not ex:
            continue
        rows = [[e.image, e.cause.replace("_", " "), e.side, e.class_name, e.score,
                 "—" if e.rank is None else f"{e.rank} / {e.limit}", e.detail] for e in ex]
        out += [f"### Examples: {t.name}", "",
                "side: which pipeline has the detection the other lacks (both: a matched pair "
                "that moved).", "",
                table(["image", "cause", "side", "class", "score", "rank / limit", "why"],
                      rows, align="lllllrl"), ""]
    return out


def _preflight(doc: CompareResult) -> list[str]:
    """`harness check` of each target's ONNX: errors and warnings listed, infos counted."""
    out: list[str] = []
    for t in doc.targets:
        c = t.tensorrt_check
        if not c:
            continue
        if "error" in c:
            out += [f"- {t.name}: not checked: {c['error']}"]
            continue
        shown = [f for f in c["findings"] if f["severity"] != "info"]
        infos = len(c["findings"]) - len(shown)
        verdict = "nothing found that stops a build" if c["builds"] else \
            f"**{sum(f['severity'] == 'error' for f in shown)} finding(s) that fail a build**"
        out += [f"**{t.name}** (TensorRT {c['trt_version']}): {verdict}"
                + (f"; {infos} informational finding(s) in results.json" if infos else ""), ""]
        if shown:
            out += [table(["severity", "check", "node", "message"],
                          [[f["severity"], f["code"], f["node"] or "—", f["message"]]
                           for f in shown], align="llll"), ""]
    if not out:
        return []
    return ["## TensorRT pre-flight (`harness check`)", "",
            "What in each target's ONNX would stop or change a TensorRT build "
            "(the same checks as `harness check FILE`).", ""] + out


def _pipeline(p: Optional[dict[str, Any]]) -> str:
    if not p:
        return "—"
    kind = p.get("kind")
    if str(kind).endswith("two-stage"):
        r, n = p["rpn"], p["rcnn"]
        return (f"{kind}: RPN nms_pre {r['nms_pre']} per {r['topk_scope']}, NMS per "
                f"{r['scope']} at IoU {r['iou_threshold']:g}, max_per_img {r['max_per_img']}; "
                f"box head score_thr {n['score_thr']:g}, IoU {n['iou_threshold']:g}, "
                f"max_per_img {n['max_per_img']} (IoU on {p.get('nms_pixels')} pixels)")
    if kind == "mmyolo":
        return (f"mmyolo (score_thr {p['score_thr']:g}, nms_pre {p['nms_pre']}, IoU "
                f"{p['iou_threshold']:g}, max_per_img {p['max_per_img']}, multi_label "
                f"{p['multi_label']})")
    keys = {"onnx": ("max_output_boxes_per_class", "iou_threshold", "score_threshold"),
            "EfficientNMS_TRT": ("max_output_boxes", "iou_threshold", "score_threshold"),
            "BatchedNMSDynamic_TRT": ("topK", "keepTopK", "iouThreshold", "scoreThreshold"),
            "BatchedNMS_TRT": ("topK", "keepTopK", "iouThreshold", "scoreThreshold"),
            "TRTBatchedNMS": ("topk", "keep_topk", "iou_threshold", "score_threshold")}
    shown = list(keys.get(kind, ())) + [k for k in ("pre_topk", "keep_topk")
                                        if k in p and k not in keys.get(kind, ())]
    name = "ONNX NonMaxSuppression" if kind == "onnx" else kind
    text = f"{name} (" + ", ".join(f"{k} {fmt(p.get(k), 4)}" for k in shown) + ")"
    return text + (f", {p['convention']} layout" if p.get("convention") else "")


def _settings_sources(t: TargetResult) -> list[str]:
    """Where each NMS setting of a file was read: an attribute, a constant input, a constant
    the graph computes, or assumed — the reader can check the ones the harness had to guess."""
    p = t.pipeline or {}
    settings = p.get("settings") or {}
    if not settings:
        return []
    rows = [[k, fmt(v.get("value"), 4), v.get("source", "—")] for k, v in settings.items()]
    for k, v in (p.get("k_read_when_run") or {}).items():
        rows.append([f"K of {k}", v, "read when the file ran (last batch)"])
    out = [f"**{t.name}: NMS settings read from the file** ({p.get('convention')} layout, "
           f"{p.get('kind')} node {p.get('nms_node')}; candidates read from "
           f"{', '.join(c for c in p.get('candidates') or [] if c)})", "",
           table(["setting", "value", "read from"], rows, align="lrl"), ""]
    return out + [f"- {n}" for n in p.get("notes") or []] + ([""] if p.get("notes") else [])


def _nonfinite_cell(lay: LayerSummary) -> str:
    bad = lay.first_nonfinite
    if not bad:
        return "none"
    return (f"{bad.module} ({bad.target} in target, {bad.reference} in PyTorch; "
            f"{lay.layers_with_nonfinite} layers)")


def _layer_notes(lay: LayerSummary) -> str:
    notes = []
    if lay.skipped:
        notes.append(f"{len(lay.skipped)} skipped")
    if lay.unmapped:
        notes.append(f"{len(lay.unmapped)} without an ONNX node")
    if lay.mapped:  # how the layers were found: every way, and how many were not
        found = [f"{v} by {k}" for k, v in lay.mapped.items() if v and k != "not mapped"]
        notes.append("mapped " + (", ".join(found) or "none") +
                     f"; {lay.mapped.get('not mapped', 0)} not mapped")
    if lay.mapping_note:
        notes.append(lay.mapping_note)
    if lay.replaced:
        notes.append(f"{len(lay.replaced)} ConvModule parts compared as their ConvModule "
                     "(the exporter folds BatchNorm into the conv)")
    if lay.marking_changed_outputs_rel_l2 is not None:
        notes.append(f"marked engine's outputs vs deployed: rel-L2 "
                     f"{fmt(lay.marking_changed_outputs_rel_l2)}")
    return "; ".join(notes) or "—"
