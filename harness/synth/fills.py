"""How an object is coloured: a flat colour, gradient or texture chosen to stand out from
what lies under and around it (background, clutter and earlier objects).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from harness.synth.canvas import ramp


def object_fill(rng: np.random.Generator, canvas: np.ndarray, alpha: np.ndarray, ox: int,
                oy: int) -> np.ndarray:
    """A colour (3,), or (h, w, 3) gradient / texture the size of alpha (h, w) placed at
    (ox, oy), that stands out from what lies under and around the shape on canvas."""
    import cv2

    h, w = canvas.shape[:2]
    ah, aw = alpha.shape
    m = 3  # a little of the surroundings too, where the outline must show
    x0, y0, x1, y1 = max(0, ox - m), max(0, oy - m), min(w, ox + aw + m), min(h, oy + ah + m)
    region = canvas[y0:y1, x0:x1].reshape(-1, 3)
    step = max(1, len(region) // 400)
    under = region[::step]
    colour = _contrasting_colour(rng, under)
    style = rng.random()
    if style < 0.6:
        return colour
    if style < 0.8:  # linear gradient towards a second colour that also contrasts
        other = _contrasting_colour(rng, under, near=colour)
        t = ramp(rng, aw, ah)[..., None]
        return colour + (other - colour) * t
    # low-frequency mottled texture or soft stripes of modest amplitude
    if rng.random() < 0.5:
        cell = float(rng.uniform(4, 10))
        gw, gh = max(2, int(aw / cell) + 2), max(2, int(ah / cell) + 2)
        tex = cv2.resize(rng.standard_normal((gh, gw), dtype=np.float32), (aw, ah),
                         interpolation=cv2.INTER_CUBIC)
    else:
        angle = rng.uniform(0, math.pi)
        period = float(rng.uniform(4, 9))
        xs = np.arange(aw, dtype=np.float32) * np.float32(math.cos(angle))
        ys = np.arange(ah, dtype=np.float32) * np.float32(math.sin(angle))
        tex = np.sin((ys[:, None] + xs[None, :]) * np.float32(2 * math.pi / period))
    return np.clip(colour + tex[..., None] * np.float32(rng.uniform(12, 22)), 0, 255)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray,
                        near: Optional[np.ndarray] = None) -> np.ndarray:
    """(3,) float32 colour at RGB distance >= 90 from at least 92 % of `under` (N, 3);
    the best of a few tries if none qualifies. With `near`, stay within ~90 of it."""
    best, best_score = None, -1.0
    for _ in range(24):
        if near is None:
            c = rng.uniform(0, 255, 3).astype(np.float32)
        else:
            c = np.clip(near + rng.uniform(-90, 90, 3), 0, 255).astype(np.float32)
        score = float((np.linalg.norm(under - c, axis=1) >= 90.0).mean())
        if score >= 0.92:
            return c
        if score > best_score:
            best, best_score = c, score
    return best
