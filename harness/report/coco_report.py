"""`coco.md`, `coco.csv` and `coco_ap_vs_latency.png` from the `coco` section of results.json:
one table of every configuration (accuracy, ΔAP to PyTorch fp32, latency, throughput; rows
that cannot run here say why; latency too unsteady to read is marked and explained), the
latency split into its stages, and AP per class."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

from harness.eval.latency import StabilityLimits
from harness.report.markdown import fmt, table
from harness.results import (
    CocoResult, CocoRow, ExperimentSection, atomic_write_text, write_section,
)

ACCURACY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
CSV_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "delta_AP")
STAGES = ("preprocess", "infer", "post", "total")
PLOT_NAME = "coco_ap_vs_latency.png"
UNSTABLE = "⚠ unstable"


def write_coco_report(doc: CocoResult, out: Path,
                      experiment: Optional[ExperimentSection] = None) -> list[Path]:
    """Write results.json (coco section, and the experiment section when given) first, then
    the CSV, the plot and coco.md from the same data."""
    from harness.report.plots import plot_ap_vs_latency

    results = write_section(out, "coco", doc, experiment)
    written = [results]
    csv_path = out / "coco.csv"
    atomic_write_text(csv_path, render_csv(doc))
    written.append(csv_path)
    plot = out / PLOT_NAME
    if plot_ap_vs_latency(doc.rows, plot):
        written.append(plot)
    md = out / "coco.md"
    atomic_write_text(md, render_coco(doc, plot.name if plot in written else None))
    written.append(md)
    return written


def _label(row: CocoRow, doc: Optional[CocoResult] = None) -> str:
    """backend device precision b<batch>, and nms_pre when the doc's rows vary it."""
    text = f"{row.backend} {row.device} {row.precision} b{row.batch}"
    axis = doc is not None and len({r.nms_pre for r in doc.rows if r.ok}) > 1
    text = f"{text} nms_pre {row.nms_pre}" if axis else text
    return f"{text} batch shapes" if row.preprocess == "batch_shapes" else text


def _lat(row: CocoRow, stage: str, stat: str) -> Any:
    return ((row.latency_ms or {}).get(stage) or {}).get(stat)


def _unstable(row: CocoRow) -> bool:
    """A row that ran and whose latency was judged unstable (rows of results written before
    latency was judged carry no judgement and are not marked)."""
    judged = row.latency_stability
    return row.ok and judged is not None and not judged["stable"]


def _mean_cell(row: CocoRow) -> Any:
    mean = _lat(row, "total", "mean")
    return f"{fmt(mean)} {UNSTABLE}" if _unstable(row) else mean


def main_table(doc: CocoResult) -> str:
    headers = ["backend", "device", "precision", "batch", "nms_pre", "preprocess", *ACCURACY,
               "ΔAP vs PyTorch fp32", "inference median (ms/batch)",
               "compute median (ms/batch)", "pipeline mean (ms/batch)",
               "pipeline p99 (ms/batch)", "images/s", "status"]
    rows = []
    for r in doc.rows:
        delta = r.delta_AP
        inf = r.inference or {}
        rows.append([r.backend, r.device, r.precision, r.batch, r.nms_pre,
                     r.preprocess.replace("_", " "), *(getattr(r, k) for k in ACCURACY),
                     None if delta is None else f"{delta:+.4f}",
                     (inf.get("host") or {}).get("median"),
                     (inf.get("compute") or {}).get("median"),
                     _mean_cell(r), _lat(r, "total", "p99"), r.images_per_s, r.status])
    return table(headers, rows, align="lllrrl" + "r" * 12 + "l", digits=3)


def delta_split_table(doc: CocoResult) -> Optional[str]:
    """ΔAP per row split into numbers and NMS (harness.eval.delta_ap); None when no row has
    the split."""
    rows = []
    for r in doc.rows:
        parts = r.delta_AP_parts or {}
        if not r.ok or r.delta_AP is None:
            continue
        rows.append([_label(r, doc), f"{r.delta_AP:+.4f}",
                     None if "numeric" not in parts else f"{parts['numeric']:+.4f}",
                     None if "nms" not in parts else f"{parts['nms']:+.4f}",
                     _by_cause(parts), parts.get("how", "—")])
    if not any(row[2] is not None for row in rows):
        return None
    return table(["configuration", "ΔAP", "numbers", "NMS", "NMS by cause", "how"], rows,
                 align="lrrrll")


def _by_cause(parts: dict) -> str:
    """"topk_cut −0.0090 (412), iou_edge −0.0010 (7); unattributed +0.0002", or —."""
    by = parts.get("nms_by_cause")
    if not by:
        return "—"
    counts = {c: v.get("detections") for c, v in (parts.get("nms_causes") or {}).items()}
    cells = [f"{c} {v:+.4f}" + (f" ({counts[c]})" if counts.get(c) is not None else "")
             for c, v in by.items()]
    return ", ".join(cells) + f"; unattributed {parts.get('nms_unattributed', 0.0):+.4f}"


HOST_BOUND_RATIO = 1.10  # an accuracy pass whose wall time exceeds its inference by more
# inference inside the pass slower than alone by more than this is said (the host's work beside
# it: H200, PyTorch batch 4 on 1000 images, 2.27 s in the pass, 1.32 s alone)
SLOWED_RATIO = 1.25


def pass_table(doc: CocoResult) -> Optional[str]:
    """Per row run in this invocation: whether its accuracy pass kept the backend busy
    (wall / inference ≤ HOST_BOUND_RATIO: inference-bound) or waited on the host (reading,
    preprocessing, NMS, writing) and by how much; None when no row computed images."""
    rows = []
    for r in doc.rows:
        p = r.accuracy_pass
        if not r.ok or not p:
            continue
        ratio = p["ratio"]
        verdict = "inference-bound" if ratio <= HOST_BOUND_RATIO else \
            f"host-bound: {ratio:.2f}× its inference time{_binding(p)}"
        alone = p.get("inference_alone_s")
        slowed = p["inference_s"] / alone if alone else None
        rows.append([_label(r, doc), p["images"], p["wall_s"], p["inference_s"], ratio,
                     "—" if alone is None else alone, "—" if slowed is None else slowed,
                     verdict + _slowed(slowed)])
    if not rows:
        return None
    return table(["configuration", "images", "wall s", "inference s", "wall / inference",
                  "inference alone s", "in pass / alone", "verdict"], rows,
                 align="lrrrrrrl", digits=3)


def _slowed(slowed: Optional[float]) -> str:
    """What the verdict adds where inference ran much slower inside the pass than alone."""
    if slowed is None or slowed <= SLOWED_RATIO:
        return ""
    return (f"; its inference took {slowed:.2f}× its time alone (the host's reading and "
            "post-processing beside it)")


def _binding(p: dict[str, Any]) -> str:
    """Which side of the host held inference up, from the pass's waits, and where its time
    outside inference went: before the first inference (the fill) and after the last (the
    drain) are paid once per pass, the rest between inference calls (older results: no
    waits or parts, nothing said of them)."""
    read, post = p.get("waited_for_reading_s"), p.get("waited_for_post_s")
    said = ""
    if read is not None and post is not None and read + post > 0:
        side = "reading + preprocessing" if read >= post else "post-processing + writing"
        said = f"; inference waited {read + post:.3g} s, mostly for {side}"
    fill, drain = p.get("fill_s"), p.get("drain_s")
    outside = p.get("wall_s", 0.0) - p.get("inference_s", 0.0)
    if fill is None or drain is None or outside <= 0:
        return said
    between = max(0.0, outside - fill - drain)
    return (f"{said}; of its {outside:.3g} s outside inference {fill:.3g} s came before the "
            f"first call and {drain:.3g} s after the last (once per pass: less of a longer "
            f"one), {between:.3g} s between calls")


def stability_text(doc: CocoResult) -> Optional[str]:
    """What the reader must know about the latency figures' steadiness: which configurations
    were unstable, by how much, against which limits, and what to do; or that all were
    within the limits. None when no row that ran carries a judgement."""
    judged = [r for r in doc.rows if r.ok and r.latency_stability is not None]
    if not judged:
        return None
    limits = _limits_text(judged)
    unstable = [r for r in judged if _unstable(r)]
    if not unstable:
        return (f"Latency stability: all {len(judged)} configurations that ran are within the "
                f"limits (unstable means {limits}).")
    which = "; ".join(f"**{_label(r, doc)}**: {r.latency_stability['reason']}"
                      for r in unstable)
    machine = doc.machine or {}
    threads, cores = machine.get("threads"), machine.get("usable_cores")
    crowded = (f" PyTorch ran {threads} threads on {cores} usable cores."
               if threads and cores and threads > cores else "")
    return (f"**{UNSTABLE} latency in {len(unstable)} of {len(judged)} configurations** "
            f"({limits}): {which}. Their mean, p99 and images/s say more about what else "
            "the machine was doing than about the backend; do not compare them with other "
            "rows. Re-run them on a quiet machine, with more timed runs "
            "(`--runs`), and with threads pinned (`OMP_NUM_THREADS` no higher than the cores "
            f"the process has to itself, e.g. under `taskset`).{crowded}")


def _limits_text(rows: list[CocoRow]) -> str:
    """The limits the rows were judged against, in words (normally one set for all)."""
    seen: list[dict[str, float]] = []
    for r in rows:
        limits = r.latency_stability["limits"]
        if limits not in seen:
            seen.append(limits)
    return " / ".join(StabilityLimits(**x).describe() for x in seen)


def stage_table(doc: CocoResult) -> str:
    headers = ["configuration"] + [f"{s} mean / p99" for s in STAGES]
    rows = []
    for r in doc.rows:
        if not r.ok:
            continue
        cells = [f"{fmt(_lat(r, s, 'mean'))} / {fmt(_lat(r, s, 'p99'))}" for s in STAGES]
        rows.append([_label(r, doc) + (f" {UNSTABLE}" if _unstable(r) else ""), *cells])
    return table(headers, rows, align="l" + "r" * len(STAGES))


def nms_pre_table(doc: CocoResult) -> Optional[str]:
    """AP per configuration (rows) and nms_pre (columns, largest first), with the change from
    the largest; None unless the rows that ran have more than one nms_pre."""
    ran = [r for r in doc.rows if r.ok and r.nms_pre is not None]
    values = sorted({r.nms_pre for r in ran}, reverse=True)
    if len(values) < 2:
        return None
    by_config: dict[tuple, dict[int, float]] = {}
    for r in ran:
        by_config.setdefault((r.backend, r.device, r.precision, r.batch, r.preprocess),
                             {})[r.nms_pre] = r.AP
    rows = []
    for (backend, device, precision, batch, mode), aps in by_config.items():
        base = aps.get(values[0])
        cells = [None if v not in aps else fmt(aps[v]) if base is None or v == values[0]
                 else f"{fmt(aps[v])} ({aps[v] - base:+.4f})" for v in values]
        shapes = " batch shapes" if mode == "batch_shapes" else ""
        rows.append([f"{backend} {device} {precision} b{batch}{shapes}", *cells])
    return table(["configuration", *(f"nms_pre {v}" for v in values)], rows,
                 align="l" + "r" * len(values))


def per_class_table(doc: CocoResult) -> Optional[str]:
    ran = [r for r in doc.rows if r.ok and r.per_class]
    if not ran:
        return None
    classes = list(ran[0].per_class)
    rows = [[name, *(r.per_class.get(name) for r in ran)] for name in classes]
    return table(["class", *(_label(r, doc) for r in ran)], rows, align="l" + "r" * len(ran))


def render_coco(doc: CocoResult, plot: Optional[str] = None) -> str:
    ds, machine = doc.dataset, doc.machine
    versions = machine.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    evaluator = (doc.evaluator or {}).get("name", "pycocotools")
    ok = [r for r in doc.rows if r.ok]
    unstable = [r for r in ok if _unstable(r)]
    stability = stability_text(doc)
    lines = [
        "# COCO accuracy and latency",
        "",
        f"{ds.images} images of `{ds.images_dir}` (annotations `{ds.annotations}`)"
        + (f"; **{ds.unreadable} unreadable images skipped**" if ds.unreadable else "")
        + f". {len(ok)} of {len(doc.rows)} configurations ran"
        + (f"; **latency of {len(unstable)} of them is unstable** ({UNSTABLE} below)"
           if unstable else "") + ".",
        "",
        f"Machine: {machine.get('cpu')}, GPU {machine.get('gpu') or 'none'}, "
        f"{machine.get('threads')} PyTorch threads. {shown}.",
        "",
        f"AP: {evaluator} COCOeval (bbox, maxDets 1/10/100; AP and AP50... at 100). "
        "ΔAP: AP minus PyTorch fp32's AP at the same batch size. Times are milliseconds per "
        "**batch**, after warm-up. *Inference*: the backend alone in its own phase — one "
        "preprocessed batch kept resident, back-to-back runs, numpy in → numpy out with "
        "every copy and conversion (the figure to compare backends by). *Compute*: the "
        "forward alone, inputs already on the device and outputs left there (CUDA events; "
        "onnxruntime through IO binding; the clock on a CPU); inference minus compute is "
        "the transfers. *Pipeline*: in a real pipeline — preprocessing (read, decode, "
        "resize, normalise), inference, decode + NMS one after the other on one thread; "
        "images/s = batch size / mean pipeline latency.",
        "",
    ]
    if ds.unreadable_images:
        lines += [f"Unreadable images skipped ({len(ds.unreadable_images)}):", ""]
        lines += [f"- {u.image}: {u.reason}" for u in ds.unreadable_images]
        lines += [""]
    lines += [main_table(doc), ""]
    if stability:
        lines += [stability, ""]
    from harness.report.coco_ranks import latency_device_text, ranks_sections

    where = latency_device_text(doc)
    lines += [where, ""] if where else []
    if plot:
        lines += [f"![AP vs latency]({plot})", ""]
    split_rows = delta_split_table(doc)
    if split_rows:
        lines += ["## ΔAP split: the numbers or the NMS", "",
                  "Against PyTorch fp32 at the same batch: *numbers* = AP of the row's own "
                  "candidates through the reference's NMS − the reference's AP; *NMS* = the "
                  "row's AP − that AP (its TopK, thresholds, ties, caps). They add up to ΔAP; "
                  "a row whose NMS is the reference's has an NMS part of 0. *NMS by cause*: "
                  "both NMS replayed on the row's candidates and diffed as `harness compare` "
                  "does; per mismatch cause, the row's AP − its AP with that cause's "
                  "detections restored to the reference's (mismatched detections in "
                  "brackets); causes interact a little, the rest is *unattributed*.", "",
                  split_rows, ""]
    passes = pass_table(doc)
    if passes:
        lines += ["## Accuracy pass: inference-bound or host-bound", "",
                  "The pass over the split in this run: its wall time over the inference "
                  "inside it, timed after one untimed warm-up call on blank images of its "
                  "first batch's sizes (a backend's and a CUDA graph's one-time set-up), "
                  "which the first images' reading overlaps. Up to 1.10 the backend was "
                  "the bottleneck (inference-bound); "
                  "above, the GPU waited on reading, preprocessing, NMS or writing "
                  "(host-bound), by that factor, and the verdict says where the time "
                  "outside inference went: before the first call and after the last are "
                  "paid once per pass (they weigh more in a short pass), the rest between "
                  "calls. *Inference alone*: the pass's batches × "
                  "the inference phase's host median (the same batch kept resident, nothing "
                  "beside it); *in pass / alone* above 1 is inference slowed by the host's "
                  "work beside it. Rows resumed from stored results have no line.", "",
                  passes, ""]
    if ok:
        lines += ["## Latency by stage (ms per batch)", "", stage_table(doc), ""]
    lines += ranks_sections(doc)
    by_nms_pre = nms_pre_table(doc)
    if by_nms_pre:
        lines += ["## AP by nms_pre", "", "COCO AP of each configuration with the pre-NMS "
                  "candidate cap (test_cfg.nms_pre) at each value of the matrix's nms_pre "
                  "axis, and the change from the largest: what a smaller TopK — TensorRT's "
                  "3840, or a deployment's own — costs.", "", by_nms_pre, ""]
    per_class = per_class_table(doc)
    if per_class:
        lines += ["## AP per class", "", "AP@[.50:.95], area all, maxDets 100; — where the "
                  "split has no object of the class.", "", per_class, ""]
    return "\n".join(lines)


def render_csv(doc: CocoResult) -> str:
    """One line per configuration: its accuracy, ΔAP, every latency statistic, the total's
    coefficient of variation, whether its latency was stable (true / false; empty when not
    judged) and why not, throughput."""
    stats = ("mean", "median", "p90", "p99", "std")
    headers = ["backend", "device", "precision", "batch", "nms_pre", "preprocess", "status",
               *CSV_STATS,
               *(f"{s}_{q}_ms" for s in STAGES for q in stats), "total_cv",
               "latency_stable", "latency_unstable_reason", "images_per_s", "images",
               "unreadable"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    for r in doc.rows:
        writer.writerow([r.backend, r.device, r.precision, r.batch, _cell(r.nms_pre),
                         r.preprocess, r.status,
                         *(_cell(getattr(r, k)) for k in CSV_STATS),
                         *(_cell(_lat(r, s, q)) for s in STAGES for q in stats),
                         _cell(_lat(r, "total", "cv")), *_stability_cells(r),
                         _cell(r.images_per_s), _cell(r.images), _cell(r.unreadable)])
    return buf.getvalue()


def _stability_cells(row: CocoRow) -> tuple[str, str]:
    judged = row.latency_stability
    if judged is None:
        return "", ""
    return ("true" if judged["stable"] else "false"), judged["reason"] or ""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
