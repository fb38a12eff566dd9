"""Detection matching at 1k, 10k and 100k detections per image: the memory-bounded matcher
(harness.align.matching.match) against the dense IoU-matrix greedy it replaces, on synthetic
detector outputs, and whether the two form identical pairs. The dense baseline runs up to 10k.

    python experiments/bench_matcher.py                          # 1k, 10k, 100k; seed 0
    python experiments/bench_matcher.py --sizes 1000 10000 100000 --seed 0
"""
from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from typing import Callable

import numpy as np

DENSE_LIMIT = 10_000  # the dense method holds detections**2 float64 (800 MB at 10k)
CASES = {"80 classes": 0.0, "one class, crowded": 0.5}  # the share of boxes piled on 200 priors


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000],
                   help="detections per image, reference and target each")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def detections(n: int, rng: np.random.Generator, crowd: float) -> tuple:
    """A reference and a target output of a detector on a 640 x 640 image, as match takes them.

    Boxes sit on the priors of strides 8, 16 and 32 (centre within the stride, sides 1 to 5
    strides), clipped to the image; 1% are collapsed to zero width. With crowd = 0: 80 classes,
    class k about 1 / (k + 1) as frequent; else one class, a share `crowd` of the boxes piled on
    200 priors. The target: boxes moved by N(0, 0.3 px), scores by N(0, 1e-3), 2% dropped, 2%
    extra, rows shuffled."""
    centres, strides = [], []
    for stride in (8, 16, 32):
        grid = (np.arange(640 // stride) + 0.5) * stride
        centres.append(np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2))
        strides.append(np.full(len(centres[-1]), float(stride)))
    centres, strides = np.concatenate(centres), np.concatenate(strides)
    prior = rng.integers(0, len(centres), n)
    piled = rng.random(n) < crowd
    prior[piled] = rng.choice(rng.choice(len(centres), 200, replace=False), piled.sum())
    centre = centres[prior] + rng.uniform(-0.5, 0.5, (n, 2)) * strides[prior, None]
    half = strides[prior, None] * rng.uniform(1, 5, (n, 2)) / 2
    boxes = np.clip(np.c_[centre - half, centre + half], 0, 640).astype(np.float32)
    collapsed = rng.random(n) < 0.01
    boxes[collapsed, 2] = boxes[collapsed, 0]
    frequency = 1 / np.arange(1, 81)
    labels = rng.choice(80, n, p=frequency / frequency.sum()) if crowd == 0 else np.zeros(n, int)
    scores = rng.random(n).astype(np.float32)
    keep, extra = rng.random(n) > 0.02, rng.integers(0, n, n // 50)
    tgt = np.concatenate([boxes[keep] + rng.normal(0, 0.3, (keep.sum(), 4)),
                          boxes[extra] + rng.uniform(-20, 20, (len(extra), 4))]).astype(np.float32)
    tgt_labels = np.concatenate([labels[keep], labels[extra]])
    shuffle = rng.permutation(len(tgt))
    return boxes, scores, labels, tgt[shuffle], tgt_labels[shuffle]


def dense_match(ref_boxes: np.ndarray, ref_scores: np.ndarray, ref_labels: np.ndarray,
                tgt_boxes: np.ndarray, tgt_labels: np.ndarray, iou: float = 0.5,
                degenerate_px: float = 1.0) -> list[tuple[int, int]]:
    """The baseline: harness.align.detections.match's greedy over the full M x K similarity
    matrix (IoU as box_iou computes it, the degenerate-box rule as match has it), filled 256
    reference rows at a time so that only the matrix itself is M x K."""
    a = np.asarray(ref_boxes, np.float64)
    b = np.asarray(tgt_boxes, np.float64)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    short_b = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    sim = np.empty((len(a), len(b)))
    for s in range(0, len(a), 256):
        block = a[s:s + 256]
        side = np.clip(np.minimum(block[:, None, 2:], b[None, :, 2:])
                       - np.maximum(block[:, None, :2], b[None, :, :2]), 0, None)
        inter = side[..., 0] * side[..., 1]
        area_a = np.prod(np.clip(block[:, 2:] - block[:, :2], 0, None), axis=1)
        union = area_a[:, None] + area_b[None, :] - inter
        dist = np.abs(block[:, None, :] - b[None, :, :]).max(axis=2)
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), (dist <= 1e-3) * 1.0)
        short_a = np.minimum(block[:, 2] - block[:, 0], block[:, 3] - block[:, 1])
        thin = (short_a < degenerate_px)[:, None] | (short_b < degenerate_px)[None, :]
        near = np.where(dist <= degenerate_px, iou + (1 - iou) * (1 - dist / degenerate_px), 0.0)
        overlap = np.where(thin, np.maximum(overlap, near), overlap)
        sim[s:s + 256] = np.where(ref_labels[s:s + 256, None] == tgt_labels[None, :], overlap, -1.0)
    taken = np.zeros(len(b), bool)
    pairs = []
    for r in np.argsort(-np.asarray(ref_scores), kind="stable").tolist():
        row = np.where(taken, -1.0, sim[r])
        j = int(np.argmax(row))
        if row[j] >= iou:
            taken[j] = True
            pairs.append((r, j))
    return pairs


def measure(run: Callable[[], object]) -> tuple[object, float, float, float]:
    """(result, seconds, tracemalloc peak MiB, growth of the process's max RSS in MiB). Timed
    without tracemalloc (it slows Python-level code several times); the peak from a second run."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024  # KiB on Linux
    tracemalloc.start()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return result, seconds, peak, rss_growth


def main() -> None:
    from harness.align.matching import match

    args = parse()
    rows = []
    # the matcher first, every size, so that its RSS growth is not hidden by a dense run's
    for case, crowd in CASES.items():
        for n in sorted(args.sizes):
            data = detections(n, np.random.default_rng(args.seed), crowd)
            got, seconds, peak, rss = measure(lambda: match(*data))
            rows.append([case, n, got.pairs, seconds, peak, rss, data])
    for row in rows:
        case, n, *_, data = row
        if n <= DENSE_LIMIT:
            pairs, seconds, peak, _ = measure(lambda: dense_match(*data))
            row[-1:] = [seconds, peak, pairs == row[2]]
        else:
            row[-1:] = [None, None, None]
    print(f"{'case':<20} {'detections':>10} {'pairs':>7} {'match s':>8} {'peak MiB':>9} "
          f"{'RSS+ MiB':>9} {'dense s':>8} {'peak MiB':>9} {'identical':>9}")
    for case, n, pairs, seconds, peak, rss, dense_s, dense_peak, same in rows:
        dense = ("-", "-", "-") if dense_s is None else (
            f"{dense_s:.2f}", f"{dense_peak:.0f}", "yes" if same else "NO")
        print(f"{case:<20} {n:>10} {len(pairs):>7} {seconds:>8.2f} {peak:>9.0f} {rss:>9.0f} "
              f"{dense[0]:>8} {dense[1]:>9} {dense[2]:>9}")
    print("peak MiB: tracemalloc's peak (numpy and Python allocations) in a second, traced call\n"
          "RSS+ MiB: growth of the process's max RSS in the timed call (0 when an earlier call\n"
          f"  reached as high); dense: the all-pairs greedy, run up to {DENSE_LIMIT} detections")


if __name__ == "__main__":
    main()
