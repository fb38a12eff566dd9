"""Plots of the reports (PNG, matplotlib's Agg backend, imported only when a plot is drawn)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness.backends.registry import plot_marker
from harness.results import CocoRow


def plot_ap_vs_latency(rows: Sequence[CocoRow], path: Path) -> bool:
    """COCO AP against mean latency per image (ms), one marker per row of the
    `coco` section that ran; batch 1 hollow, larger batches filled. False when no row ran."""
    done = [r for r in rows if r.ok and r.AP is not None and r.latency_ms]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fp32": "tab:blue", "fp16": "tab:orange", "bf16": "tab:purple",
               "int8": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = []
    for r in done:
        per_image = r.latency_ms["total"]["mean"] / r.batch
        xs.append(per_image)
        colour = colours.get(r.precision, "tab:gray")
        ax.scatter(per_image, r.AP, marker=plot_marker(r.backend), s=60,
                   edgecolors=colour, facecolors="none" if r.batch == 1 else colour,
                   linewidths=1.5)
        ax.annotate(f"{r.backend} {r.device} {r.precision} b{r.batch}",
                    (per_image, r.AP), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    if max(xs) > 10 * min(xs):  # a log axis only where the spread needs one
        ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("mean latency per image (ms; batch latency / batch size)")
    ax.set_ylabel("COCO AP @[.50:.95]")
    ax.set_title("AP vs latency (hollow: batch 1, filled: larger batch)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
