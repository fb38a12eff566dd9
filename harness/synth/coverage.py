"""Anti-aliased coverage of a shape: how much of each pixel it fills, exact along x and
supersampled along y, with the even-odd rule so that a ring's hole stays empty.
"""
from __future__ import annotations

import math

import numpy as np

from harness.synth.shapes import Shape

_SUPERSAMPLE = 8  # coverage rows sampled per pixel row


def rasterize(shape: Shape) -> tuple[np.ndarray, int, int]:
    """Coverage (h, w) float32 in [0, 1] of the whole shape, and the origin (x, y) of that
    array in the image.

    Exact along x and sampled on _SUPERSAMPLE rows per pixel along y, with the even-odd rule
    (a ring's hole stays empty). cv2.fillPoly is not used: its fill includes every pixel the
    outline touches, which grows a shape by about half a pixel all round and puts pixels
    outside the annotated box.
    """
    x0, y0, x1, y1 = shape.extent()
    ox, oy = int(math.floor(x0)), int(math.floor(y0))
    mw, mh = int(math.ceil(x1)) - ox + 1, int(math.ceil(y1)) - oy
    ss = _SUPERSAMPLE
    pts = np.concatenate(shape.contours)
    ax, ay = pts[:, 0] - ox, pts[:, 1] - oy
    following = np.arange(1, len(pts) + 1)  # each edge runs to the next vertex of its contour
    ends = np.cumsum([len(c) for c in shape.contours])
    following[ends - 1] = ends - np.array([len(c) for c in shape.contours])
    bx, by = ax[following], ay[following]
    # sub-row k samples y = (k + 0.5) / ss; an edge crosses the rows with lo <= y < hi
    k0 = np.ceil(np.minimum(ay, by) * ss - 0.5).astype(np.int64)
    counts = np.maximum(np.ceil(np.maximum(ay, by) * ss - 0.5).astype(np.int64) - k0, 0)
    edge = np.repeat(np.arange(len(ax)), counts)
    rows = np.repeat(k0 - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
    y = (rows + 0.5) / ss
    xs = ax[edge] + (y - ay[edge]) * (bx[edge] - ax[edge]) / (by[edge] - ay[edge])
    xs = np.clip(xs, 0.0, mw - 1e-6)
    order = np.argsort(rows * float(mw + 1) + xs, kind="stable")
    rows, xs = rows[order], xs[order]
    # even-odd: consecutive crossings on a row bound one span, [x_in, x_out); a span adds
    # the ramp +1 from x_in and -1 from x_out, with the fraction of the pixel each cuts
    sign = np.where(np.arange(len(xs)) % 2 == 0, 1.0, -1.0) / ss
    col = np.floor(xs).astype(np.int64)
    frac = xs - col
    base = (rows // ss) * (mw + 1) + col
    diff = np.bincount(np.concatenate([base, base + 1]),
                       weights=np.concatenate([sign * (1.0 - frac), sign * frac]),
                       minlength=mh * (mw + 1))
    cover = np.cumsum(diff.reshape(mh, mw + 1), axis=1)[:, :mw]
    return np.clip(cover, 0.0, 1.0).astype(np.float32), ox, oy
