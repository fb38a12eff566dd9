"""`sensitivity.md` and `sensitivity.png` from the `sensitivity` section of results.json: the
verdict, each group's cost and recovery, the greedy search's steps, and how to build the
chosen set with TensorRT."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.report.markdown import table
from harness.results import SensitivityResult, atomic_write_text, write_section

PLOT_NAME = "sensitivity.png"
REPORT_NAME = "sensitivity.md"


def write_sensitivity_report(doc: SensitivityResult, out: Path) -> list[Path]:
    """results.json (sensitivity section) first, then the plot and the markdown."""
    results = write_section(out, "sensitivity", doc)
    written = [results]
    plot = out / PLOT_NAME
    if plot_sensitivity(doc, plot):
        written.append(plot)
        doc.files["plot"] = plot.name
        write_section(out, "sensitivity", doc)
    md = out / REPORT_NAME
    atomic_write_text(md, render_sensitivity(doc, plot.name if plot in written else None))
    written.append(md)
    return written


def _signed(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:+.4f}"


def render_sensitivity(doc: SensitivityResult, plot: Optional[str] = None) -> str:
    p = doc.precision
    data = doc.dataset
    calib = doc.calibration
    lines = [
        f"# Which layers to keep in fp32 ({p})", "",
        f"**Verdict:** {doc.verdict}.", "",
        f"Model: `{doc.model.get('config')}`; reference: {doc.reference}; "
        f"{data.get('images')} images of `{data.get('images_dir')}` "
        f"({data.get('unreadable', 0)} unreadable); COCO AP@[.50:.95] by {doc.evaluator}.",
    ]
    if calib:
        lines.append(f"int8 calibration: {calib['method']} on {calib['count']} images of "
                     f"`{calib['images']}`; Q/DQ on the inputs of Conv / Gemm / MatMul, "
                     "symmetric, per-channel weights.")
    lines += [
        "",
        "| | AP | ΔAP vs fp32 |", "|:---|---:|---:|",
        f"| fp32 | {doc.AP_fp32:.4f} | — |",
        f"| {p}, every group | {doc.AP_quantized:.4f} | {doc.delta_AP_quantized:+.4f} |",
        f"| {p}, {', '.join(doc.chosen) or 'no group'} in fp32 | {doc.AP_chosen:.4f} | "
        f"{doc.delta_AP_chosen:+.4f} |",
        "",
        f"Limit: ΔAP within {doc.limit:.4f} ({doc.limit_given}): "
        f"{'met' if doc.met else 'not met'}.",
    ]
    held = doc.holdout
    if held is not None:
        share = held.recovered_fraction
        lines += [
            "", f"Checked on {held.images} held-out images (the next ones by id, not seen by "
            "the search):", "",
            "| | AP | ΔAP vs fp32 |", "|:---|---:|---:|",
            f"| fp32 | {held.AP_fp32:.4f} | — |",
            f"| {p}, every group | {held.AP_quantized:.4f} | "
            f"{held.AP_quantized - held.AP_fp32:+.4f} |",
            f"| {p}, {', '.join(doc.chosen) or 'no group'} in fp32 | {held.AP_chosen:.4f} | "
            f"{held.AP_chosen - held.AP_fp32:+.4f} |", "",
            "Recovered there: " + ("—" if share is None else f"{100 * share:.0f} %")
            + " of the held-out ΔAP."]
    lines += [
        "",
        f"## Each group alone in fp32 ({doc.level} level, {len(doc.groups)} groups)", "",
        "Recovered = AP with the group alone in fp32 − AP with every group at "
        f"{p}; ranked by recovered AP per fp32 GFLOP (GFLOPs per image, 2 × MACs of the "
        f"group's convolutions; {doc.total_gflops:.3f} in the network).", "",
    ]
    ranked = sorted(doc.groups, key=lambda g: g.rank or 0)
    lines.append(table(
        ["rank", "group", "module", "ONNX / TensorRT prefix", "ops", "GFLOPs", "FLOP share",
         "AP", "recovered", "recovered / GFLOP"],
        [[g.rank, g.name, g.kind, f"`{g.prefix}`", g.quantized_ops, round(g.gflops, 4),
          f"{100 * g.flop_share:.1f} %", g.AP, _signed(g.recovered),
          _signed(g.recovered_per_gflop)] for g in ranked],
        align="rlllrrrrrr", digits=4))
    lines += ["", "## Greedy search", ""]
    if not doc.steps:
        lines.append("Nothing to search: " + (
            "the fully converted model is within the limit." if doc.met else
            "no group recovers any AP on its own."))
    else:
        lines.append("Groups with a positive recovery, added in "
                     + ("ranking order" if doc.order == "per-gflop" else
                        "order of recovered AP")
                     + "; each combined set measured again; a group that does not raise the "
                       "AP is dropped again.")
        lines.append("")
        lines.append(table(
            ["step", "added", "AP of the set", "ΔAP vs fp32", "recovered", "FLOP share in fp32",
             "kept"],
            [[i + 1, s.added, s.AP, f"{s.delta_AP:+.4f}",
              f"{s.AP - doc.AP_quantized:+.4f}", f"{100 * s.flop_share:.1f} %", s.kept]
             for i, s in enumerate(doc.steps)], align="rlrrrrl", digits=4))
    files = doc.files
    lines += ["", "## Files", ""]
    if files.get("mixed_onnx"):
        lines.append(f"- `{files['mixed_onnx']}`: the {p} ONNX with "
                     f"{', '.join(doc.chosen) or 'no group'} in fp32 (run it with "
                     "onnxruntime, or build it with TensorRT).")
    if files.get("constraints"):
        lines.append(f"- `{files['constraints']}`: the same groups as TensorRT layer-name "
                     "prefixes; `harness build "
                     f"{files.get('mixed_onnx', 'model.onnx')} -o model.engine --precision {p} "
                     f"--fp32-layers {files['constraints']}` sets `layer.precision` and each "
                     "output's type to fp32 on those layers, with "
                     "`OBEY_PRECISION_CONSTRAINTS`.")
    if plot:
        lines += ["", f"![recovered AP per group and the greedy search]({plot})"]
    lines += ["", f"{doc.measurements.get('measured', 0)} variants measured in this run, "
              f"{doc.measurements.get('stored', 0)} read from the store; {doc.seconds:.0f} s.",
              "", "The APs are of a subset: before shipping, check the chosen set on the "
              "whole split (`harness coco` with the mixed ONNX as the experiment's "
              f"`model.onnx.{p}`).", ""]
    return "\n".join(lines)


def plot_sensitivity(doc: SensitivityResult, path: Path) -> bool:
    """Left: AP each group recovers alone in fp32 (ranking order, GFLOPs annotated); right:
    AP of the greedy search's sets against the share of FLOPs left in fp32, between the
    fully converted and the fp32 AP. False when there is nothing to draw."""
    groups = sorted((g for g in doc.groups if g.recovered is not None),
                    key=lambda g: g.rank or 0)
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.3 * len(groups) + 1.5)),
                                      gridspec_kw={"width_ratios": [3, 2]})
    names = [g.name for g in groups]
    values = [g.recovered for g in groups]
    chosen = set(doc.chosen)
    colours = ["tab:green" if n in chosen else
               ("tab:blue" if v > 0 else "tab:gray") for n, v in zip(names, values)]
    y = list(range(len(groups)))[::-1]
    left.barh(y, values, color=colours)
    left.set_yticks(y, names, fontsize=7)
    for yi, g in zip(y, groups):
        left.annotate(f"{g.gflops:.3f} GFLOPs", (g.recovered, yi), textcoords="offset points",
                      xytext=(4 if g.recovered >= 0 else -4, -3), fontsize=6,
                      ha="left" if g.recovered >= 0 else "right")
    left.axvline(0, color="black", linewidth=0.8)
    loss = -doc.delta_AP_quantized
    if loss > 0:
        left.axvline(loss, color="tab:red", linestyle="--", linewidth=0.8,
                     label=f"all of the {doc.precision} loss ({loss:.4f})")
        left.legend(fontsize=7, loc="lower right")
    left.set_xlabel(f"AP recovered with the group alone in fp32 (vs every group {doc.precision})")
    left.set_title("Each group (ranked by recovered AP per GFLOP; green: chosen)", fontsize=9)
    left.margins(x=0.25)

    xs = [0.0] + [s.flop_share * 100 for s in doc.steps]
    ys = [doc.AP_quantized] + [s.AP for s in doc.steps]
    right.plot(xs, ys, marker="o", color="tab:blue")
    for s, x_, y_ in zip(doc.steps, xs[1:], ys[1:]):
        right.annotate(("+ " if s.kept else "× ") + _short(s.added), (x_, y_),
                       textcoords="offset points", xytext=(4, 4), fontsize=6)
    right.axhline(doc.AP_fp32, color="tab:green", linestyle="--", linewidth=0.8,
                  label=f"fp32 {doc.AP_fp32:.4f}")
    right.axhline(doc.AP_quantized, color="tab:red", linestyle="--", linewidth=0.8,
                  label=f"every group {doc.precision} {doc.AP_quantized:.4f}")
    right.axhline(doc.AP_fp32 - doc.limit, color="tab:gray", linestyle=":", linewidth=0.8,
                  label=f"limit (ΔAP {doc.limit:.4f})")
    right.margins(x=0.3, y=0.1)
    right.set_xlabel("share of the network's FLOPs kept in fp32 (%)")
    right.set_ylabel("COCO AP @[.50:.95]")
    right.set_title("Greedy search (× : tried, dropped)", fontsize=9)
    right.legend(fontsize=7, loc="lower right")
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _short(name: str, width: int = 24) -> str:
    """A module path short enough for a plot label: its last components."""
    parts = name.split(".")
    while len(parts) > 1 and len(".".join(parts)) > width:
        parts = parts[1:]
    return ".".join(parts)
