"""Putting an object on the canvas over earlier ones, with the bookkeeping of how much of
each still shows (alpha compositing), so that every annotated object stays half visible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.synth.canvas import blend
from harness.synth.coverage import rasterize
from harness.synth.fills import object_fill
from harness.synth.shapes import Shape

_MIN_VISIBLE = 0.5  # every annotated object keeps at least half its area visible
_MIN_INSIDE = 0.6  # a truncated object keeps at least this much inside the image


@dataclass
class Placed:
    """A drawn object and how much of it still shows, as alpha compositing decides: at each
    pixel its coverage times (1 - coverage) of every object drawn over it."""

    shape: Shape
    full_area: float  # coverage summed over the whole shape, inside the image or not
    x0: int  # where `visible` lies in the image
    y0: int
    visible: np.ndarray  # (h, w) float32, the part of each pixel still showing this object
    visible_area: float  # visible.sum()


def try_place(rng: np.random.Generator, canvas: np.ndarray, placed: list[Placed],
              shape: Shape) -> bool:
    """Draw `shape` on top if it stays enough inside the image and leaves every earlier
    object at least _MIN_VISIBLE visible; otherwise change nothing and return False.

    Draws from `rng` (the fill) only when the shape is placed.
    """
    h, w = canvas.shape[:2]
    cover, ox, oy = rasterize(shape)
    full = float(cover.sum())
    ch, cw = cover.shape
    x0, y0, x1, y1 = max(0, ox), max(0, oy), min(w, ox + cw), min(h, oy + ch)
    if full <= 0 or x0 >= x1 or y0 >= y1:
        return False
    inside = cover[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    inside_area = float(inside.sum())
    if inside_area < _MIN_INSIDE * full:
        return False
    hides = []  # (earlier object, its region under the new one, the new coverage there, loss)
    for obj in placed:
        vh, vw = obj.visible.shape
        ix0, iy0 = max(x0, obj.x0), max(y0, obj.y0)
        ix1, iy1 = min(x1, obj.x0 + vw), min(y1, obj.y0 + vh)
        if ix0 >= ix1 or iy0 >= iy1:
            continue
        under = obj.visible[iy0 - obj.y0:iy1 - obj.y0, ix0 - obj.x0:ix1 - obj.x0]
        over = inside[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        loss = float((under * over).sum())
        if obj.visible_area - loss < _MIN_VISIBLE * obj.full_area:
            return False
        hides.append((obj, under, over, loss))

    blend(canvas, cover, ox, oy, object_fill(rng, canvas, cover, ox, oy))
    for obj, under, over, loss in hides:
        under *= 1.0 - over
        obj.visible_area -= loss
    placed.append(Placed(shape=shape, full_area=full, x0=x0, y0=y0,
                         visible=inside.copy(), visible_area=inside_area))
    return True
