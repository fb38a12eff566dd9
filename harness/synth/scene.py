"""One synthetic picture from one random stream: its size, clutter, the objects and where
they go (anywhere, or as a near-duplicate or overlapping partner of an earlier one).
Every draw from the stream happens in a fixed order, so a seed always gives the same bytes.
"""
from __future__ import annotations

import math

import numpy as np

from harness.synth.canvas import background, blur_and_noise
from harness.synth.clutter import draw_clutter
from harness.synth.occlusion import Placed, try_place
from harness.synth.shapes import CLASSES, SHAPE_KINDS, Shape, make_shape

# Image geometry: both sides within [224, 512], aspect w/h within [0.5, 2].
_SIDE_MIN, _SIDE_MAX = 224, 512
_ASPECT_MIN, _ASPECT_MAX = 0.5, 2.0

# Target shape area per size class, as ranges of sqrt(area) in pixels, and how often each is
# drawn. The ranges keep clear of the 32 / 96 borders so that occlusion (which lowers the
# visible area written to the file) moves few objects across them; the probabilities are set
# so the *written* mix is about 30 / 45 / 25 %.
_SIZE_SQRT_RANGES = ((12.0, 30.0), (35.0, 90.0), (106.0, 180.0))
_SIZE_PROBS = (0.28, 0.42, 0.30)

_PLACEMENT_TRIES = 20  # random places tried for an object before it is left out
_PAIR_TRIES = 20  # offsets tried for a near-duplicate or overlapping partner


def render_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[Placed]]:
    """One picture (H, W, 3) uint8 BGR and its objects, drawn from `rng` alone."""
    w, h = _image_size(rng)
    canvas = background(rng, w, h)
    for _ in range(int(rng.integers(3, 11))):
        draw_clutter(rng, canvas)

    placed: list[Placed] = []
    for _ in range(int(rng.integers(1, 9))):
        kind = rng.random()
        # only an object that still shows nearly all of itself can have another put over it
        anchors = [p.shape for p in placed if p.visible_area >= 0.9 * p.full_area]
        if anchors and kind < 0.36:
            anchor = anchors[int(rng.integers(len(anchors)))]
            make_partner = _near_duplicate if kind < 0.22 else _overlapping_other
            # any() stops at the first partner placed: later attempts draw nothing
            if any(try_place(rng, canvas, placed, make_partner(rng, anchor, attempt))
                   for attempt in range(_PAIR_TRIES)):
                continue
        # size and look fixed once, so that retries move the object rather than shrink it
        label = int(rng.integers(len(CLASSES)))
        base = make_shape(label, SHAPE_KINDS[label].random_params(rng), _target_area(rng),
                          0.0, 0.0, 0.9 * w, 0.9 * h)
        any(try_place(rng, canvas, placed, _placed_anywhere(rng, base, w, h))
            for _ in range(_PLACEMENT_TRIES))

    # a few thin strokes over everything, as real clutter crosses objects too
    for _ in range(int(rng.integers(0, 3))):
        draw_clutter(rng, canvas, kinds=("line", "dots"))
    return blur_and_noise(rng, canvas), placed


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(_ASPECT_MIN), math.log(_ASPECT_MAX)))  # w / h
    ratio = max(aspect, 1.0 / aspect)
    long_side = rng.uniform(max(_SIDE_MIN * ratio, 288.0), _SIDE_MAX)
    short_side = max(float(_SIDE_MIN), long_side / ratio)
    if aspect >= 1.0:
        return int(round(long_side)), int(round(short_side))
    return int(round(short_side)), int(round(long_side))


def _target_area(rng: np.random.Generator) -> float:
    size = int(rng.choice(3, p=_SIZE_PROBS))
    lo, hi = _SIZE_SQRT_RANGES[size]
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) ** 2


def _placed_anywhere(rng: np.random.Generator, shape: Shape, w: int, h: int) -> Shape:
    """`shape` (centred on the origin) moved to a random place: mostly fully inside the
    image, now and then cut by its border."""
    x0, y0, x1, y1 = shape.extent()
    slack = 0.35 if rng.random() < 0.1 else 0.0
    sw, sh = (x1 - x0) * slack, (y1 - y0) * slack
    cx = rng.uniform(-x0 - sw, w - x1 + sw)
    cy = rng.uniform(-y0 - sh, h - y1 + sh)
    return shape.moved(cx, cy)


def _near_duplicate(rng: np.random.Generator, anchor: Shape, attempt: int) -> Shape:
    """Same class and look, scaled a little, shifted a little (more with each attempt, until
    the anchor stays half visible)."""
    kind = anchor.kind
    params = dict(anchor.params)
    if params.get("angle"):
        params["angle"] = float(params["angle"] + rng.uniform(-8, 8))
    lo, hi = kind.near_duplicate_offset
    direction = kind.near_duplicate_direction(rng)
    return _offset_from(anchor, anchor.label, params, rng.uniform(0.8, 1.15),
                        rng.uniform(lo, hi) + 0.012 * attempt, direction)


def _overlapping_other(rng: np.random.Generator, anchor: Shape, attempt: int) -> Shape:
    """Another class over much of the anchor."""
    label = (anchor.label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
    return _offset_from(anchor, label, SHAPE_KINDS[label].random_params(rng),
                        rng.uniform(0.5, 1.3), rng.uniform(0.2, 0.4) + 0.012 * attempt,
                        rng.uniform(0, 2 * math.pi))


def _offset_from(anchor: Shape, label: int, params: dict, area_scale: float, offset: float,
                 direction: float) -> Shape:
    """A shape of `label` with area_scale × the anchor's area, its centre moved from the
    anchor's by `offset` × the anchor's box size in `direction` (radians)."""
    x0, y0, x1, y1 = anchor.extent()
    cx = (x0 + x1) / 2 + offset * (x1 - x0) * math.cos(direction)
    cy = (y0 + y1) / 2 + offset * (y1 - y0) * math.sin(direction)
    return make_shape(label, params, anchor.area() * area_scale, cx, cy, 1e9, 1e9)
