"""What one call of the fast post-processing path costs (harness.eval.coco_post.fast_detections),
alone and beside busy threads, per batch size: the fixed cost per call that a COCO pass's
drain waits for after its last inference.

For each batch size it feeds the fixture's own head outputs (host arrays, as a file's
session returns them) and prints the median milliseconds per call, per image, the device
ops (aten calls) and host-device synchronisations of one call, and the median again with
`--busy` threads running pure Python at the pass's GIL switch interval (a worst case: a
pass's reading and writing threads mostly wait); on a GPU for the eager calls and for the
replays of their CUDA graphs (harness.eval.coco_graphs) one line each.

    python experiments/bench_fast_post.py --device cuda --batches 1 4 8 16
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="where post-processing runs (cpu, cuda)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument("--calls", type=int, default=30, help="timed calls per batch size")
    p.add_argument("--busy", type=int, default=4,
                   help="threads running Python beside it in the second column")
    return p.parse_args()


def main() -> None:
    args = parse()
    import numpy as np
    import torch

    from harness.eval.coco_pass import plan_batches, prepare_batch
    from harness.eval.coco_graphs import GraphedPost
    from harness.eval.coco_post import fast_detections
    from harness.models.mmyolo import flat_head_outputs, load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
    from harness.eval.coco_split import open_split
    from harness.synth import generate_synthetic_coco

    work = Path(tempfile.mkdtemp(prefix="bench_fast_post_"))
    generate_synthetic_coco(work / "synth", images=2 * max(args.batches), seed=1,
                            val_fraction=0.5)
    split = open_split(work / "synth" / "val2017")
    model = load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    print(f"fixture, post-processing on {args.device}; ms per call (median of {args.calls})")
    print(f"{'batch':>5} {'form':>6} {'ms/call':>8} {'ms/image':>8} {'aten ops':>8} "
          f"{'syncs':>6} {'ms/call, ' + str(args.busy) + ' busy threads':>26}")
    graphs = GraphedPost(model, args.device) if str(args.device).startswith("cuda") else None
    for b in args.batches:
        p = prepare_batch(plan_batches(split.images, b)[0], model.preprocess)
        with torch.no_grad():
            raw = flat_head_outputs(model.raw_outputs(torch.from_numpy(p.inputs)))
        outputs = {k: np.ascontiguousarray(v.numpy()) for k, v in raw.items()}
        for form, g in [("eager", None)] + ([("graph", graphs)] if graphs else []):
            def once(g=g) -> None:
                fast_detections(model, outputs, p.metas, args.device, graphs=g)

            def call(once=once) -> float:
                t0 = time.perf_counter()
                once()
                return time.perf_counter() - t0

            for _ in range(5):
                call()
            alone = statistics.median(call() for _ in range(args.calls))
            ops, syncs = count_ops(once, args.device)
            busy = with_busy_threads(call, args.calls, args.busy)
            print(f"{b:>5} {form:>6} {1e3 * alone:>8.2f} {1e3 * alone / b:>8.2f} {ops:>8} "
                  f"{syncs:>6} {1e3 * busy:>26.2f}")
    if graphs is not None:
        print(f"CUDA graphs: {graphs.describe()}")


def count_ops(fn, device: str) -> tuple[int, str]:
    """(aten calls of one call, host-device synchronisations: counted on a GPU only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    if not str(device).startswith("cuda"):
        return ops, "-"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ops, str(sum("synchroniz" in str(w.message) for w in caught))


def busy_threads(count: int, stop: threading.Event) -> list[threading.Thread]:
    """`count` started threads running pure Python until `stop` is set."""
    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def with_busy_threads(call, calls: int, busy: int) -> float:
    """Median of `calls` calls while `busy` threads run pure Python (they hold the GIL in
    turns with it, as a pass's reading and writing threads do)."""
    import sys

    from harness.eval.coco_pass import SWITCH_INTERVAL_S

    stop = threading.Event()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as during a pass
    threads = busy_threads(busy, stop)
    try:
        return statistics.median(call() for _ in range(calls))
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(switch)


if __name__ == "__main__":
    main()
