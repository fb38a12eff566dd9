"""What reading one image costs a COCO pass's reader, stage by stage, and the array steps
side by side with the plain numpy formulas they replace (the same values:
tests/models/test_preprocess_arrays.py).

For the fixture's preprocessing (or --config's) on a generated synthetic split, per image
(mean and median ms over --repeats rounds): decode (cv2.imdecode), the pixel steps (resize,
letterbox), the (C, H, W) float32 input (harness's / transposed, converted and normalised
into new arrays), and stacking a batch of --batch into a reused slot / into a new array.

    python experiments/bench_preprocess.py --count 100
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100, help="images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--config", default=None, help="a model config (default: the fixture)")
    return p.parse_args()


def plain_chw(img: np.ndarray, spec) -> np.ndarray:
    """The input as transposed, converted and normalised into new arrays (before)."""
    chw = np.ascontiguousarray(img.transpose(2, 0, 1))
    if spec.bgr_to_rgb:
        chw = chw[[2, 1, 0]]
    x = chw.astype(np.float32)
    if spec.normalize:
        x = (x - np.asarray(spec.mean, np.float32).reshape(3, 1, 1)) / \
            np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    return x


def main() -> None:
    import cv2

    from harness.data.preprocess import (
        _APPLY, _normalized_chw, stack_inputs, stacked_shape,
    )
    from harness.models.mmyolo import read_config
    from harness.models.pipeline import preprocess_spec_from_config
    from harness.models.zoo import FIXTURE_CONFIG
    from harness.synth import generate_synthetic_coco

    args = parse()
    cv2.setNumThreads(1)  # as in a reader process
    spec = preprocess_spec_from_config(read_config(args.config or FIXTURE_CONFIG))
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    generate_synthetic_coco(work / "synth", images=2 * args.count, seed=3, val_fraction=0.5)
    files = sorted((work / "synth" / "val2017").glob("*.jpg"))[:args.count]
    data = [np.fromfile(str(f), dtype=np.uint8) for f in files]
    times: dict[str, list[float]] = {k: [] for k in (
        "decode", "resize + letterbox", "input (harness)", "input (plain)",
        "stack into slot", "stack (new array)")}
    clock = time.perf_counter
    slot = None
    for _ in range(args.repeats):
        done = []
        for raw in data:
            t0 = clock()
            img = cv2.imdecode(raw, cv2.IMREAD_COLOR)
            t1 = clock()
            for step in spec.steps:
                img = _APPLY[type(step)](img, step)[0]
            t2 = clock()
            x = _normalized_chw(img, spec)
            t3 = clock()
            plain_chw(img, spec)
            t4 = clock()
            for key, a, b in (("decode", t0, t1), ("resize + letterbox", t1, t2),
                              ("input (harness)", t2, t3), ("input (plain)", t3, t4)):
                times[key].append(b - a)
            done.append(x)
        for i in range(0, len(done) - args.batch + 1, args.batch):
            batch = done[i:i + args.batch]
            shape = stacked_shape(batch, spec)
            if slot is None or slot.shape != shape:
                slot = np.zeros(shape, np.float32)
            t0 = clock()
            stack_inputs(batch, spec, out=slot)
            t1 = clock()
            stack_inputs(batch, spec)
            times["stack into slot"].append((t1 - t0) / args.batch)
            times["stack (new array)"].append((clock() - t1) / args.batch)
    print(f"{len(files)} images x {args.repeats}; ms per image (batches of {args.batch} "
          "for stacking)")
    print(f"{'stage':<20} {'mean':>7} {'median':>7}")
    for key, v in times.items():
        print(f"{key:<20} {1e3 * statistics.mean(v):>7.3f} {1e3 * statistics.median(v):>7.3f}")
    m = {k: statistics.mean(v) for k, v in times.items()}
    before = m["decode"] + m["resize + letterbox"] + m["input (plain)"] + m["stack (new array)"]
    now = m["decode"] + m["resize + letterbox"] + m["input (harness)"] + m["stack into slot"]
    print(f"input: plain / harness {m['input (plain)'] / m['input (harness)']:.1f}x; "
          f"stacking: new array / slot {m['stack (new array)'] / m['stack into slot']:.1f}x; "
          f"a reader's image: before / now {before / now:.2f}x")

if __name__ == "__main__":
    main()
