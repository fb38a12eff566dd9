"""Distractors drawn on the canvas that are clearly none of the shape classes: thin strokes,
scribbles, tiny dots and very soft blobs. One function per kind, chosen from one table.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from harness.synth.canvas import blend

Colour = tuple[float, float, float]


def draw_clutter(rng: np.random.Generator, canvas: np.ndarray,
                 kinds: tuple[str, ...] = ("line", "scribble", "dots", "blob")) -> None:
    """One distractor of a kind picked from `kinds`, drawn in place on canvas (H, W, 3)."""
    h, w = canvas.shape[:2]
    kind = kinds[int(rng.integers(len(kinds)))]
    colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
    _CLUTTER[kind](rng, canvas, w, h, colour)


def _line(rng: np.random.Generator, canvas: np.ndarray, w: int, h: int, colour: Colour) -> None:
    import cv2

    p = rng.uniform((0, 0), (w, h))
    length, angle = rng.uniform(20, 0.6 * max(w, h)), rng.uniform(0, 2 * math.pi)
    q = p + length * np.array([math.cos(angle), math.sin(angle)])
    cv2.line(canvas, _fixed(p), _fixed(q), colour, int(rng.integers(1, 3)), cv2.LINE_AA,
             shift=4)


def _scribble(rng: np.random.Generator, canvas: np.ndarray, w: int, h: int,
              colour: Colour) -> None:
    import cv2

    steps = int(rng.integers(5, 16))
    heading = rng.uniform(0, 2 * math.pi)
    pts = [rng.uniform((0, 0), (w, h))]
    for _ in range(steps):
        heading += rng.normal(0, 0.9)
        pts.append(pts[-1] + rng.uniform(4, 14) * np.array([math.cos(heading),
                                                            math.sin(heading)]))
    poly = np.round((np.asarray(pts) - 0.5) * 16).astype(np.int32)
    cv2.polylines(canvas, [poly], False, colour, 1, cv2.LINE_AA, shift=4)


def _dots(rng: np.random.Generator, canvas: np.ndarray, w: int, h: int, colour: Colour) -> None:
    import cv2

    centre = rng.uniform((0, 0), (w, h))
    for _ in range(int(rng.integers(3, 12))):
        p = centre + rng.normal(0, 20, 2)
        cv2.circle(canvas, _fixed(p), int(rng.uniform(1.0, 2.5) * 16), colour, -1,
                   cv2.LINE_AA, shift=4)


def _blob(rng: np.random.Generator, canvas: np.ndarray, w: int, h: int, colour: Colour) -> None:
    """A faint Gaussian smudge, no edge to mistake for a disc."""
    sx, sy = rng.uniform(5, 20, 2)
    angle = rng.uniform(0, math.pi)
    r = int(3 * max(sx, sy)) + 1
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (xx * c + yy * s) / sx, (yy * c - xx * s) / sy
    layer = np.exp(-0.5 * (u * u + v * v)) * np.float32(rng.uniform(0.25, 0.6))
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
    blend(canvas, layer, cx - r, cy - r, np.array(colour, np.float32))


_CLUTTER: dict[str, Callable[[np.random.Generator, np.ndarray, int, int, Colour], None]] = {
    "line": _line, "scribble": _scribble, "dots": _dots, "blob": _blob}


def _fixed(p) -> tuple[int, int]:
    """Continuous pixel coordinates → cv2 fixed-point (shift=4) point of the same place."""
    return int(round((p[0] - 0.5) * 16)), int(round((p[1] - 0.5) * 16))
