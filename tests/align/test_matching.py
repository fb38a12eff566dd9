"""The memory-bounded matcher against the dense greedy it must equal (written out here from its
docstring), on small random cases full of ties, degenerate and non-finite boxes, and at 100k
detections per image, where the greedy's decisions are checked on a sample."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from harness.align import matching
from harness.align.matching import Matching, box_iou, match


def dense_similarity(a: np.ndarray, b: np.ndarray, iou: float, degenerate_px: float):
    """(similarity, IoU, L-inf corner distance) matrices of boxes a (M, 4) and b (K, 4)."""
    with np.errstate(all="ignore"):
        side = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:])
                       - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
        inter = side[..., 0] * side[..., 1]
        area_a, area_b = (np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1) for x in (a, b))
        union = area_a[:, None] + area_b[None, :] - inter
        dist = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2)
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1),
                           (dist <= 1e-3).astype(float))
        if degenerate_px <= 0:
            return overlap, overlap, dist
        short_a, short_b = (np.minimum(x[:, 2] - x[:, 0], x[:, 3] - x[:, 1]) for x in (a, b))
        thin = (short_a < degenerate_px)[:, None] | (short_b < degenerate_px)[None, :]
        near = np.where(dist <= degenerate_px, iou + (1 - iou) * (1 - dist / degenerate_px), 0.0)
        return np.where(thin, np.maximum(overlap, near), overlap), overlap, dist


def usable(a: np.ndarray, b: np.ndarray, labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        finite_a, finite_b = (np.isfinite(x).all(1) & np.isfinite(x[:, 2:] - x[:, :2]).all(1)
                              for x in (a, b))
    return (labels_a[:, None] == labels_b[None, :]) & finite_a[:, None] & finite_b[None, :]


def dense_greedy(ref_boxes, ref_scores, ref_labels, tgt_boxes, tgt_labels, iou=0.5,
                 degenerate_px=1.0) -> Matching:
    """The greedy over the full similarity matrix as harness.align.detections.match did it, plus
    the degenerate-box rule; boxes with a non-finite coordinate match nothing."""
    a = np.asarray(ref_boxes, np.float64).reshape(-1, 4)
    b = np.asarray(tgt_boxes, np.float64).reshape(-1, 4)
    sim, overlap, dist = dense_similarity(a, b, iou, degenerate_px)
    sim = np.where(usable(a, b, np.asarray(ref_labels), np.asarray(tgt_labels)), sim, -1.0)
    taken = np.zeros(len(b), bool)
    pairs = []
    for r in np.argsort(-np.asarray(ref_scores), kind="stable").tolist():
        row = np.where(taken, -1.0, sim[r])
        j = int(np.argmax(row)) if row.size else -1
        if j >= 0 and row[j] >= iou:
            taken[j] = True
            pairs.append((r, j))
    matched = {r for r, _ in pairs}
    return Matching(pairs=pairs, lonely_ref=[r for r in range(len(a)) if r not in matched],
                    lonely_tgt=np.flatnonzero(~taken).tolist(),
                    by_distance=[bool(overlap[r, j] < iou) for r, j in pairs],
                    distance_px=[float(dist[r, j]) for r, j in pairs])


def random_case(rng: np.random.Generator) -> tuple:
    """Boxes on a small integer grid (ties in IoU, identical boxes), zero-area and inverted
    boxes, twins moved by 0..2 px, inf / NaN coordinates, three scores, three labels."""
    n, k = rng.integers(0, 14, 2)
    scale = rng.choice([1.0, 0.01, 100.0])

    def boxes(count):
        xy = rng.integers(0, 20, (count, 2)).astype(float)
        return np.c_[xy, xy + rng.choice([0, 0.5, 1, 2, 5, 8, 15, -1], (count, 2))] * scale

    ref, tgt = boxes(n), boxes(k)
    twins = min(n, k) // 2
    moved = rng.choice([0, 1e-4, 0.3, 1, 2], (twins, 1)) * rng.integers(-1, 2, (twins, 4))
    tgt[rng.permutation(k)[:twins]] = ref[:twins] + moved
    for b in (ref, tgt):
        if len(b) and rng.random() < 0.25:
            b[rng.integers(len(b)), rng.integers(4)] = rng.choice([np.nan, np.inf, -np.inf])
    return (ref, rng.choice([0.1, 0.5, 0.9], n), rng.integers(0, 3, n), tgt,
            rng.integers(0, 3, k), float(rng.choice([0.1, 0.3, 0.5, 0.7, 1.0])),
            float(rng.choice([0.0, 1.0, 2.5])))


@pytest.mark.parametrize("budget", [(1 << 18, 4096), (3, 2), (1, 1)],
                         ids=["default-chunks", "small-chunks", "one-pair-chunks"])
def test_equals_the_dense_greedy_on_random_cases(monkeypatch, budget):
    monkeypatch.setattr(matching, "PAIR_BUDGET", budget[0])
    monkeypatch.setattr(matching, "REF_BLOCK", budget[1])
    rng = np.random.default_rng(budget[0])
    for case in range(150):
        *arrays, iou, degenerate_px = random_case(rng)
        want = dense_greedy(*arrays, iou=iou, degenerate_px=degenerate_px)
        got = match(*arrays, iou=iou, degenerate_px=degenerate_px)
        assert got == want, f"case {case}, iou {iou}, degenerate_px {degenerate_px}"


def near_the_bound_case(rng: np.random.Generator) -> tuple:
    """Boxes of any scale and aspect, targets made from them at IoU = iou in exact arithmetic
    (wider by 1 / iou, or moved by w (1 - iou) / (1 + iou)), give or take 1e-12, and at random:
    a search bound that is too tight by 0.1% fails here."""
    n, k = rng.integers(1, 60, 2)
    scale, iou = 10 ** rng.uniform(-2, 3), float(rng.choice([rng.uniform(0.05, 1), 0.5, 1 / 3]))
    centre = rng.uniform(0, 50, (n, 2)) * scale
    side = np.exp(rng.uniform(np.log(0.02), np.log(30), (n, 2))) * scale
    side[rng.random(n) < 0.1, 0] = 0
    ref = np.c_[centre - side / 2, centre + side / 2]
    tgt = ref[rng.integers(0, n, k)]
    w, h = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    how = rng.integers(0, 4, k)
    tgt[how == 0, 2] = tgt[how == 0, 0] + w[how == 0] / iou
    tgt[how == 1, 0::2] += (w[how == 1] * (1 - iou) / (1 + iou))[:, None]
    tgt[how == 2, 1::2] += (h[how == 2] * (1 - iou) / (1 + iou))[:, None]
    tgt[how == 3] += rng.normal(0, 0.2, ((how == 3).sum(), 4)) * np.c_[w, h, w, h][how == 3]
    tgt += rng.choice([0, 0, 1e-12, -1e-12], (k, 1)) * scale
    return (ref, rng.choice([0.1, 0.5, 0.9], n), rng.integers(0, 2, n), tgt,
            rng.integers(0, 2, k), iou, float(rng.choice([0, 1, 0.5 * scale])))


@pytest.mark.parametrize("budget", [(1 << 18, 4096), (7, 5)],
                         ids=["default-chunks", "small-chunks"])
def test_equals_the_dense_greedy_at_the_search_bound(monkeypatch, budget):
    monkeypatch.setattr(matching, "PAIR_BUDGET", budget[0])
    monkeypatch.setattr(matching, "REF_BLOCK", budget[1])
    rng = np.random.default_rng(budget[0])
    for case in range(150):
        *arrays, iou, degenerate_px = near_the_bound_case(rng)
        want = dense_greedy(*arrays, iou=iou, degenerate_px=degenerate_px)
        got = match(*arrays, iou=iou, degenerate_px=degenerate_px)
        assert got == want, f"case {case}, iou {iou}, degenerate_px {degenerate_px}"


def test_greedy_order_ties_and_labels():
    ref = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    tgt = [[1, 0, 11, 10], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    # the second reference scores highest and takes the identical target of the lowest row;
    # the first ties with the third on score and goes first; label 1 matches only label 1
    got = match(ref, [0.5, 0.9, 0.5, 0.5], [0, 0, 0, 1], tgt, [0, 0, 0, 0])
    assert got.pairs == [(1, 1), (0, 2), (2, 0)]
    assert got.lonely_ref == [3] and got.lonely_tgt == [3]
    assert got.by_distance == [False] * 3 and got.distance_px == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("ref, tgt", [([[0, 0, 10, 10]], [[0, 0, 20, 10]]),  # IoU 1/2 exactly
                                      ([[0, 0, 30, 10]], [[10, 0, 40, 10]]),
                                      ([[0, 0, 10, 30]], [[0, 10, 10, 40]])])
def test_pairs_exactly_at_the_threshold_match(ref, tgt):
    assert box_iou(ref, tgt)[0, 0] == 0.5
    assert match(ref, [1.0], [0], tgt, [0], iou=0.5).pairs == [(0, 0)]
    assert match(ref, [1.0], [0], tgt, [0], iou=np.nextafter(0.5, 1)).pairs == []


def test_empty_sides():
    empty = np.zeros((0, 4))
    one = np.array([[0.0, 0.0, 1.0, 1.0]])
    assert match(empty, [], [], empty, []) == Matching([], [], [], [], [])
    assert match(one, [1.0], [0], empty, []).lonely_ref == [0]
    assert match(empty, [], [], one, [0]).lonely_tgt == [0]
    assert box_iou(empty, one).shape == (0, 1)


def test_box_iou():
    a = [[0, 0, 10, 10], [0, 5, 0, 9]]  # the second has zero width
    b = [[0, 0, 10, 20], [1e-3, 5, 1e-3, 9], [2e-3, 5, 2e-3, 9]]  # 1e-3 px: the same box
    assert box_iou(a, b).tolist() == [[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_a_zero_width_box_matches_its_twin_by_distance():
    ref = [[100.0, 50.0, 100.0, 80.0]]  # collapsed onto the image border
    for twin, by_distance in [([100.0, 50.0, 100.0001, 80.0], True),  # 1e-4 px wide: IoU 0
                              ([100.3, 50.0, 100.3, 80.0], True),  # moved 0.3 px: IoU 0
                              ([100.0001, 50.0, 100.0001, 80.0], False)]:  # coincides: IoU 1
        got = match(ref, [0.9], [3], [twin], [3])
        assert got.pairs == [(0, 0)] and got.by_distance == [by_distance]
        assert got.distance_px == [pytest.approx(max(abs(np.subtract(twin, ref[0]))))]
    for twin in ([102.0, 50.0, 102.0, 80.0], [100.0, 50.0, 100.0, 82.0]):  # moved 2 px
        got = match(ref, [0.9], [3], [twin], [3])
        assert got.pairs == [] and got.lonely_ref == [0] and got.lonely_tgt == [0]
    # the rule off; and exactly degenerate_px apart the similarity is exactly iou
    assert match(ref, [0.9], [3], [[100.0, 50.0, 100.0001, 80.0]], [3], degenerate_px=0).pairs == []
    assert match(ref, [0.9], [3], [[101.0, 50.0, 101.0, 80.0]], [3], iou=0.7).pairs == [(0, 0)]


def test_non_finite_boxes_never_match_nor_block():
    box = [0.0, 0.0, 10.0, 10.0]
    bad = [[np.nan, 0, 10, 10], [0, 0, np.inf, 10], [-np.inf, 0, np.inf, 10]]
    got = match(bad + [box], [0.9, 0.8, 0.7, 0.6], [0] * 4, bad + [box], [0] * 4)
    assert got.pairs == [(3, 3)] and got.lonely_ref == [0, 1, 2] and got.lonely_tgt == [0, 1, 2]


@pytest.mark.parametrize("iou, degenerate_px", [(0.0, 1.0), (1.5, 1.0), (0.5, -1.0), (0.5, np.inf)])
def test_settings_out_of_range(iou, degenerate_px):
    with pytest.raises(ValueError, match="need 0 < iou <= 1"):
        match([[0, 0, 1, 1]], [1.0], [0], [[0, 0, 1, 1]], [0], iou=iou, degenerate_px=degenerate_px)


def detector_like(n: int, rng: np.random.Generator) -> tuple:
    """n boxes around the priors of a 640 x 640 detector (strides 8, 16, 32), sides 1 to 5
    strides, clipped to the image, 1% collapsed to zero width, half of them in class 0 and the
    rest in 80 classes; the target is the reference jittered by 0.3 px, 2% dropped, 2% extra,
    rows shuffled."""
    centres, strides = [], []
    for stride in (8, 16, 32):
        grid = (np.arange(640 // stride) + 0.5) * stride
        centres.append(np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2))
        strides.append(np.full(len(centres[-1]), float(stride)))
    centres, strides = np.concatenate(centres), np.concatenate(strides)
    prior = rng.integers(0, len(centres), n)
    centre = centres[prior] + rng.uniform(-0.5, 0.5, (n, 2)) * strides[prior, None]
    half = strides[prior, None] * rng.uniform(1, 5, (n, 2)) / 2
    ref = np.clip(np.c_[centre - half, centre + half], 0, 640).astype(np.float32)
    collapsed = rng.random(n) < 0.01
    ref[collapsed, 2] = ref[collapsed, 0]
    labels = np.where(rng.random(n) < 0.5, 0, rng.integers(0, 80, n))
    keep = rng.random(n) > 0.02
    extra = rng.integers(0, n, n // 50)
    tgt = np.concatenate([ref[keep] + rng.normal(0, 0.3, (keep.sum(), 4)).astype(np.float32),
                          ref[extra] + rng.uniform(-20, 20, (len(extra), 4)).astype(np.float32)])
    tgt_labels = np.concatenate([labels[keep], labels[extra]])
    shuffle = rng.permutation(len(tgt))
    return ref, rng.random(n).astype(np.float32), labels, tgt[shuffle], tgt_labels[shuffle]


def test_100k_detections_in_bounded_memory_and_greedy_on_a_sample():
    rng = np.random.default_rng(0)
    ref, scores, labels, tgt, tgt_labels = detector_like(100_000, rng)
    tracemalloc.start()
    try:
        got = match(ref, scores, labels, tgt, tgt_labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 30, f"peak {peak / 2**20:.0f} MiB"
    assert len(got.pairs) > 0.95 * len(ref)
    # the greedy, checked for sampled references: at its turn (its rank in score order) each
    # took the best free target of its label (ties: the lowest row), or none reached iou
    rank = np.empty(len(ref), int)
    rank[np.argsort(-scores, kind="stable")] = np.arange(len(ref))
    owner = np.full(len(tgt), len(ref))  # the rank of the reference that took each target
    for r, t in got.pairs:
        owner[t] = rank[r]
    ref_of, a, b = dict(got.pairs), ref.astype(np.float64), tgt.astype(np.float64)
    for r in rng.choice(len(ref), 100, replace=False).tolist():
        sim = dense_similarity(a[r:r + 1], b, 0.5, 1.0)[0][0]
        free = (owner >= rank[r]) & usable(a[r:r + 1], b, labels[r:r + 1], tgt_labels)[0]
        best = np.flatnonzero(free & (sim == sim[free].max()))[0] if free.any() else None
        if best is not None and sim[best] >= 0.5:
            assert ref_of.get(r) == best, f"reference {r}"
        else:
            assert r not in ref_of and r in got.lonely_ref, f"reference {r}"
