"""The picture around the objects: a smooth gradient-and-texture background, alpha blending
onto it, and the last blur and pixel noise over everything.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)],
                             dtype=np.float32)


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) float32: a two-colour linear gradient plus smooth low-frequency texture.

    Both are smooth, so they are built on a coarse grid and enlarged: cubic to a quarter of
    the size, then linear (a full-size cubic resize costs as much as the rest of the image).
    """
    import cv2

    c0 = rng.uniform(20, 235, 3).astype(np.float32)
    c1 = rng.uniform(20, 235, 3).astype(np.float32)
    cell = float(rng.uniform(24, 64))
    gw, gh = max(2, int(w / cell) + 2), max(2, int(h / cell) + 2)
    grid = c0 + (c1 - c0) * ramp(rng, gw, gh)[..., None]
    grid += rng.standard_normal((gh, gw, 1), dtype=np.float32) * np.float32(rng.uniform(6, 18))
    grid += rng.standard_normal((gh, gw, 3), dtype=np.float32) * np.float32(rng.uniform(2, 8))
    grid = cv2.resize(grid, ((w + 3) // 4, (h + 3) // 4), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)


def ramp(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w) float32 in [0, 1], linear along a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(w, dtype=np.float32) * np.float32(math.cos(angle))
    ys = np.arange(h, dtype=np.float32) * np.float32(math.sin(angle))
    t = ys[:, None] + xs[None, :]
    t -= t.min()
    return t / max(float(t.max()), 1e-6)


def blend(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int, fill: np.ndarray) -> None:
    """canvas = canvas·(1-α) + fill·α over the part of the layer at (x0, y0) inside canvas.

    canvas: (H, W, 3) float32, changed in place; alpha: (h, w); fill: (3,) colour or
    (h, w, 3) image the size of `alpha`.
    """
    h, w = canvas.shape[:2]
    ah, aw = alpha.shape
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x0 + aw), min(h, y0 + ah)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    a = alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None]
    if fill.ndim == 3:
        fill = fill[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    region = canvas[cy0:cy1, cx0:cx1]
    region += (fill - region) * a


def blur_and_noise(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """The finished picture (H, W, 3) uint8: now and then a slight blur, always pixel noise."""
    import cv2

    if rng.random() < 0.2:
        sigma = float(rng.uniform(0.5, 1.0))
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    # Gaussian pixel noise through a 256-level quantile table: a full-size standard_normal
    # draw costs more than everything else in the picture together
    levels = rng.integers(0, 256, canvas.shape, dtype=np.uint8)
    canvas = cv2.scaleAdd(cv2.LUT(levels, _NORMAL_QUANTILES), float(rng.uniform(2.0, 8.0)),
                          canvas)
    return cv2.convertScaleAbs(np.maximum(canvas, 0, out=canvas))
