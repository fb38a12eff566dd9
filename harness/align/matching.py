"""Greedy matching of one image's detections between two backends: exactly the dense IoU-matrix
greedy, without the matrix. Candidate pairs come from grids of sorted cell keys a chunk at a time,
so memory stays bounded with every NMS survivor of an image; degenerate boxes match by distance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

PAIR_BUDGET = 1 << 18  # candidate pairs held at once (~200 bytes each in temporaries)
REF_BLOCK = 4096  # references whose grid probes are made at once
SAME_PX = 1e-3  # two zero-area boxes this close are the same box (box_iou)
_SLACK = 1e-6  # widens every search bound, so float rounding never loses a pair at the threshold
# size grid cells in octave sides (y: in same-size reaches): a probe is fine x cells in a y row
_X_CELL, _Y_CELL = 1 / 32, 3 / 2
_MAX_CELL = (1 << 19) - 1  # cell indices are clipped: far cells merge (slower, never wrong)


@dataclass
class Matching:
    """pairs: (reference row, target row) in the order the greedy formed them; lonely_ref /
    lonely_tgt: unmatched rows, sorted; by_distance: the degenerate-box rule decided the pair
    (its IoU alone is below the threshold); distance_px: L-inf distance of the pair's corners."""

    pairs: list[tuple[int, int]]
    lonely_ref: list[int]
    lonely_tgt: list[int]
    by_distance: list[bool]
    distance_px: list[float]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a (M, 4) and b (K, 4), float64; two zero-area boxes have
    IoU 1 when they coincide (within 1e-3 px), else 0. Builds M x K: small matrices only."""
    a, b = (np.asarray(x, np.float64).reshape(-1, 4) for x in (a, b))
    i, j = np.repeat(np.arange(len(a)), len(b)), np.tile(np.arange(len(b)), len(a))
    iou = _similarity(a[i], b[j], _area(a)[i], _area(b)[j], np.zeros(len(i), bool), 1.0, 0)[0]
    return iou.reshape(len(a), len(b))


def match(ref_boxes: np.ndarray, ref_scores: np.ndarray, ref_labels: np.ndarray,
          tgt_boxes: np.ndarray, tgt_labels: np.ndarray, *, iou: float = 0.5,
          degenerate_px: float = 1.0) -> Matching:
    """Greedy by descending reference score (stable sort): each reference takes the unmatched
    target of its label with the highest similarity (the lowest row on ties) if that is >= iou.

    Similarity is IoU; where either box is degenerate (width or height < degenerate_px; 0 turns
    the rule off) it is max(IoU, s), s = iou + (1 - iou) * (1 - d / degenerate_px) for the L-inf
    corner distance d <= degenerate_px, else 0: 1 for identical boxes, iou at degenerate_px.
    A box with a non-finite coordinate matches nothing.
    ref_boxes: (M, 4) xyxy; ref_scores, ref_labels: (M,); tgt_boxes: (K, 4) xyxy; tgt_labels: (K,)
    """
    if not (0 < iou <= 1 and 0 <= degenerate_px < np.inf):  # (at iou 0 every pair qualifies)
        raise ValueError(f"need 0 < iou <= 1 and a finite degenerate_px >= 0, got {iou} and "
                         f"{degenerate_px}")
    order = np.argsort(-np.asarray(ref_scores), kind="stable")
    label = np.unique(np.concatenate([np.ravel(ref_labels), np.ravel(tgt_labels)]),
                      return_inverse=True)[1].ravel()
    sides = []  # boxes (references in greedy order), label, usable, area, degenerate
    for boxes, lab in ((np.reshape(ref_boxes, (-1, 4))[order], label[:len(order)][order]),
                       (tgt_boxes, label[len(order):])):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        with np.errstate(invalid="ignore", over="ignore"):
            ok = np.isfinite(boxes).all(1) & np.isfinite(boxes[:, 2:] - boxes[:, :2]).all(1)
        # inf / NaN boxes (fp16 overflow) take part in no pair; zeros keep the arithmetic quiet
        boxes = np.where(ok[:, None], boxes, 0.0)
        short = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        sides.append((boxes, lab, ok, _area(boxes), ok & (short < degenerate_px)))
    (ref, _, _, area_r, thin_r), (tgt, _, _, area_t, thin_t) = sides
    taken = np.zeros(len(tgt), bool)
    formed: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.intp),) * 2]
    for p, t in _candidates(*sides, iou, degenerate_px):
        p, t = p[~taken[t]], t[~taken[t]]
        sim = _similarity(ref[p], tgt[t], area_r[p], area_t[t], thin_r[p] | thin_t[t], iou,
                          degenerate_px)[0]
        p, t, sim = p[sim >= iou], t[sim >= iou], sim[sim >= iou]
        by_preference = np.lexsort((t, -sim, p))
        p, t = p[by_preference], t[by_preference]
        first = np.flatnonzero(np.diff(p, prepend=-1))
        won, best = [], t[first].tolist()
        # each reference takes its best candidate, unless one before it in this chunk did
        for i, (s, e) in enumerate(zip(first.tolist(), first[1:].tolist() + [len(p)])):
            free = t[s:e][~taken[t[s:e]]] if taken[best[i]] else (best[i],)
            if len(free):
                best[i] = int(free[0])
                taken[best[i]] = True
                won.append(i)
        formed.append((p[first[won]], np.array(best, np.intp)[won]))
    p, t = (np.concatenate(side) for side in zip(*formed))
    overlap, dist = _similarity(ref[p], tgt[t], area_r[p], area_t[t], thin_r[p], iou, 0)
    matched = np.zeros(len(ref), bool)
    matched[p] = True
    return Matching(pairs=list(zip(order[p].tolist(), t.tolist())),
                    lonely_ref=np.sort(order[~matched]).tolist(),
                    lonely_tgt=np.flatnonzero(~taken).tolist(),
                    by_distance=(overlap < iou).tolist(), distance_px=dist.tolist())


def _area(boxes: np.ndarray) -> np.ndarray:
    side = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None)
    return side[:, 0] * side[:, 1]


def _similarity(a: np.ndarray, b: np.ndarray, area_a: np.ndarray, area_b: np.ndarray,
                thin: np.ndarray, iou: float, degenerate_px: float) -> tuple[np.ndarray, ...]:
    """(similarity, L-inf corner distance) of paired boxes a, b: (P, 4) xyxy, areas (P,), thin
    (P,): either box degenerate. One arithmetic for box_iou and match, so ties break alike."""
    side = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
    inter = side[:, 0] * side[:, 1]
    union = area_a + area_b - inter
    d = np.abs(a - b)
    dist = np.maximum(np.maximum(d[:, 0], d[:, 1]), np.maximum(d[:, 2], d[:, 3]))
    # two zero-area boxes (clamped to the image border) are the same box when they coincide
    sim = np.where(union > 0, inter / np.where(union > 0, union, 1), (dist <= SAME_PX) * 1.0)
    if degenerate_px > 0:
        near = np.where(dist <= degenerate_px, iou + (1 - iou) * (1 - dist / degenerate_px), 0.0)
        sim = np.where(thin, np.maximum(sim, near), sim)
    return sim, dist


class _Grid:
    """Target rows sorted by (group, cell row, cell column): a run of cells in a row is a range."""

    def __init__(self, rows: np.ndarray, group: np.ndarray, ky: np.ndarray, kx: np.ndarray):
        self.groups, gid = np.unique(group, return_inverse=True)
        keys = (gid.ravel() << 40) | (ky << 20) | kx
        by_key = np.argsort(keys, kind="stable")
        self.keys, self.rows = keys[by_key], rows[by_key]

    def probe(self, owner: np.ndarray, group: np.ndarray, ky: tuple, kx: tuple) -> tuple:
        """(owner, lo, hi): `rows` ranges of cells ky0..ky1 x kx0..kx1 of the owners' groups."""
        gid = np.searchsorted(self.groups, group)
        hit = gid < len(self.groups)
        hit[hit] = self.groups[gid[hit]] == group[hit]
        owner, gid, ky0, ky1, kx0, kx1 = (v[hit] for v in (owner, gid, *ky, *kx))
        q, ky = np.repeat(np.arange(len(owner)), ky1 - ky0 + 1), _ranges(ky0, ky1 + 1)
        row = (gid[q] << 40) | (ky << 20)
        return (owner[q], np.searchsorted(self.keys, row | kx0[q]),
                np.searchsorted(self.keys, row | kx1[q], "right"))


def _candidates(ref_side: tuple, tgt_side: tuple, iou: float,
                degenerate_px: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(reference positions, target rows) of every pair of similarity >= iou, and others, in
    chunks of about PAIR_BUDGET pairs in position order; a pair both grids find comes twice.
    IoU >= iou needs positive areas: a grid of (label, width and height octave, centre cell).
    The distance and coincidence rules need a thin or zero-area box: a grid of (label, x1 y1)."""
    ref, ref_label, ok_r, area_r, thin_r = ref_side
    tgt, tgt_label, ok_t, area_t, thin_t = tgt_side
    near_r, near_t = thin_r | (ok_r & (area_r == 0)), thin_t | (ok_t & (area_t == 0))
    t = iou * (1 - _SLACK)  # a smaller threshold only widens the bounds
    y_cell = max((1 - iou) / (1 + iou), 1 / 64) * _Y_CELL

    def cells(bw: np.ndarray, bh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # (floored: the cells of sides below 2**-1000 px must not underflow to 0)
        return np.ldexp(_X_CELL, np.maximum(bw, -1000)), np.ldexp(y_cell, np.maximum(bh, -1000))

    def size_probes(pos: np.ndarray) -> tuple:
        """Each octave pair and centre cells where a target at IoU >= t with `pos` can be."""
        a = ref[pos]
        w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        bw0, bw1, bh0, bh1 = (_octave(np.clip(v, 5e-324, 1e308))
                              for v in (w * t, w / t, h * t, h / t))
        q = np.repeat(np.arange(len(pos)), (bw1 - bw0 + 1) * (bh1 - bh0 + 1))
        k = _ranges(0, (bw1 - bw0 + 1) * (bh1 - bh0 + 1))
        bw, bh = bw0[q] + k // (bh1 - bh0 + 1)[q], bh0[q] + k % (bh1 - bh0 + 1)[q]
        w, h = w[q], h[q]
        with np.errstate(invalid="ignore", over="ignore"):
            # the sides a target of these octaves can have at IoU >= t
            w0, w1 = np.maximum(np.ldexp(1.0, bw), t * w), np.minimum(np.ldexp(1.0, bw + 1), w / t)
            h0, h1 = np.maximum(np.ldexp(1.0, bh), t * h), np.minimum(np.ldexp(1.0, bh + 1), h / t)
            # the reach is linear in the target's width, largest where its height is the ref's
            ws, hs = np.clip(w, w0, np.maximum(w0, w1)), np.clip(h, h0, np.maximum(h0, h1))
            rx = np.maximum(_reach(w, h, w0, hs, t), _reach(w, h, w1, hs, t))
            ry = np.maximum(_reach(h, w, h0, ws, t), _reach(h, w, h1, ws, t))
            ok = ((w0 <= w1) & (h0 <= h1) & (rx >= 0) & (ry >= 0)
                  & (w0 * h0 <= w * h / t) & (w1 * h1 >= t * w * h))
        q, bw, bh, rx, ry = q[ok], bw[ok], bh[ok], rx[ok], ry[ok]
        a, (cw, ch) = a[q], cells(bw, bh)
        return by_size.probe(pos[q], _group(ref_label[pos[q]], bw, bh),
                             _span((a[:, 1] + a[:, 3]) / 2, ry, ch),
                             _span((a[:, 0] + a[:, 2]) / 2, rx, cw))

    b = np.flatnonzero(ok_t & (area_t > 0))
    bw, bh = _octave(tgt[b, 2] - tgt[b, 0]), _octave(tgt[b, 3] - tgt[b, 1])
    cw, ch = cells(bw, bh)
    by_size = _Grid(b, _group(tgt_label[b], bw, bh), _cell((tgt[b, 1] + tgt[b, 3]) / 2, ch),
                    _cell((tgt[b, 0] + tgt[b, 2]) / 2, cw))
    near_px = max(degenerate_px, SAME_PX) * (1 + _SLACK)
    c, b = max(near_px, 1 / 16), np.flatnonzero(ok_t)
    near = _Grid(b, 2 * tgt_label[b] + near_t[b], _cell(tgt[b, 1], c), _cell(tgt[b, 0], c))
    for s in range(0, len(ref), REF_BLOCK):
        pos = np.arange(s, min(s + REF_BLOCK, len(ref)))
        # near references probe both halves of their label in the near grid, others one half
        at = np.repeat(pos[ok_r[pos]], 1 + near_r[pos[ok_r[pos]]])
        half = ~(near_r[at] & (np.diff(at, prepend=-1) != 0))
        probes = [(by_size, size_probes(pos[ok_r[pos] & (area_r[pos] > 0)])),
                  (near, near.probe(at, 2 * ref_label[at] + half, _span(ref[at, 1], near_px, c),
                                    _span(ref[at, 0], near_px, c)))]
        ends = np.cumsum(sum(np.bincount(o - s, hi - lo, len(pos)) for _, (o, lo, hi) in probes))
        # chunks of references: PAIR_BUDGET pairs, plus at most one reference's own
        cuts = np.searchsorted(ends, np.arange(PAIR_BUDGET, ends[-1] + 1, PAIR_BUDGET), "right")
        bounds = np.unique(np.r_[0, cuts, len(pos)])
        for cut, end in zip(bounds[:-1], bounds[1:]):
            parts = []
            for grid, (o, lo, hi) in probes:
                i, j = np.searchsorted(o, [s + cut, s + end])
                o, lo, hi = o[i:j], lo[i:j], hi[i:j]
                parts.append((np.repeat(o, hi - lo), grid.rows[_ranges(lo, hi)]))
            yield tuple(np.concatenate(side) for side in zip(*parts))


def _reach(wa: np.ndarray, ha: np.ndarray, wb: np.ndarray, hb: np.ndarray, t: float) -> np.ndarray:
    """Largest |centre x offset| of boxes (wa, ha), (wb, hb) at IoU >= t: the intersection is
    at most (wa + wb) / 2 - |dcx| wide, min(ha, hb) high, and at least t (A + B) / (1 + t)."""
    return (wa + wb) / 2 - t * (wa * ha + wb * hb) / ((1 + t) * np.minimum(ha, hb))


def _octave(side: np.ndarray) -> np.ndarray:
    """b with 2**b <= side < 2**(b + 1), exactly (side > 0, finite): -1075 < b < 1024."""
    return np.frexp(side)[1].astype(np.int64) - 1


def _group(label: np.ndarray, bw: np.ndarray, bh: np.ndarray) -> np.ndarray:
    return (label.astype(np.int64) << 24) | ((bw + 1100) << 12) | (bh + 1100)


def _cell(v: np.ndarray, cell: np.ndarray | float) -> np.ndarray:
    """Cell index, offset to 1..2**20 - 1 for _Grid's keys."""
    return np.clip(np.floor(v / cell), -_MAX_CELL, _MAX_CELL).astype(np.int64) + _MAX_CELL + 1


def _span(v: np.ndarray, reach: np.ndarray | float, cell: np.ndarray | float) -> tuple:
    """First and last cell of v +- reach (widened for rounding)."""
    reach = reach + _SLACK * (1 + np.abs(v))
    return _cell(v - reach, cell), _cell(v + reach, cell)


def _ranges(lo: np.ndarray | int, hi: np.ndarray) -> np.ndarray:
    """lo[i]..hi[i] - 1 for every i, concatenated."""
    n = hi - lo
    ends = np.cumsum(n)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - n - lo, n)
