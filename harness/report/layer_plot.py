"""The layer-diff plot: relative L2 error along network depth, one line per target."""
from __future__ import annotations

from pathlib import Path

from harness.results import CompareResult


def plot_layer_errors(doc: CompareResult, path: Path) -> bool:
    """Write `path` (PNG) from a compare section; False when no target has layer rows."""
    series = [(t.name, t.layers) for t in doc.targets
              if t.available and t.layers is not None and t.layers.rows]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, lay in series:
        depth = [r.depth for r in lay.rows]
        # a zero error cannot sit on a log axis: draw it at the floor
        err = [max(r.rel_l2, 1e-9) for r in lay.rows]
        line, = ax.plot(depth, err, marker=".", linewidth=1.2,
                        label=f"{name} ({lay.precision})")
        ax.axhline(lay.tolerance, color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("relative L2 error vs PyTorch")
    ax.set_title("Layer error along network depth (dotted: tolerance of the precision)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
