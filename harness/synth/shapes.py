"""The five shape classes of the synthetic dataset, one small class per kind: what each draws
from the random stream for its look, its polygon(s) for a given area, and how a near-duplicate
of it is offset. `Shape` is one object's geometry in pixel coordinates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

_MIN_SIDE = 10.0  # no object narrower than this, in pixels


class ShapeKind:
    """One class of object. Subclasses set the attributes and write `_draw_look` and
    `local_contours`; the random draws of `random_params` are part of the dataset's bytes."""

    name: str
    rotates = False  # now and then turned by up to ±30°
    min_side = _MIN_SIDE
    # Where a near-duplicate's offset (share of the anchor's size) starts. A ring's hole and
    # a cross's gaps let a copy shifted by 10-25 % leave half of the anchor showing (box IoU
    # about 0.5-0.7); a filled copy that close would hide more than half of it, so those start
    # further out, shifted mostly along one axis, which keeps the box IoU highest (0.35-0.45).
    near_duplicate_offset: tuple[float, float]

    def random_params(self, rng: np.random.Generator) -> dict:
        """Parameters of this kind independent of size and position."""
        p: dict = {"angle": 0.0}
        if self.rotates and rng.random() < 0.4:
            p["angle"] = float(rng.uniform(-30, 30))
        self._draw_look(rng, p)
        return p

    def _draw_look(self, rng: np.random.Generator, p: dict) -> None:
        """Add the kind's own parameters to `p`, drawn from `rng` in a fixed order."""

    def local_contours(self, p: dict, area: float) -> list[np.ndarray]:
        """Contours (N, 2) centred on the origin, unrotated, enclosing about `area` pixels."""
        raise NotImplementedError

    def outline(self, contours: list[np.ndarray]) -> np.ndarray:
        """(M, 2) the single polygon written as the segmentation."""
        return contours[0]

    def near_duplicate_direction(self, rng: np.random.Generator) -> float:
        """Direction (radians) in which a near-duplicate is shifted from its anchor."""
        return rng.uniform(0, 2 * math.pi)


def _circle(area: float, hole: float) -> tuple[np.ndarray, float]:
    """Unit circle (64, 2) and the radius that encloses `area` with a hole of `hole` × it."""
    radius = math.sqrt(area / (math.pi * (1.0 - hole ** 2)))
    theta = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    return np.stack([np.cos(theta), np.sin(theta)], axis=1), radius


def _along_an_axis(rng: np.random.Generator) -> float:
    return math.pi / 2 * int(rng.integers(4)) + rng.uniform(-0.3, 0.3)


class Disc(ShapeKind):
    name = "disc"
    near_duplicate_offset = (0.30, 0.40)

    def local_contours(self, p: dict, area: float) -> list[np.ndarray]:
        circle, radius = _circle(area, 0.0)
        return [circle * radius]

    def near_duplicate_direction(self, rng: np.random.Generator) -> float:
        return _along_an_axis(rng)


class Rectangle(ShapeKind):
    name = "rectangle"
    rotates = True
    near_duplicate_offset = (0.34, 0.45)

    def _draw_look(self, rng: np.random.Generator, p: dict) -> None:
        p["aspect"] = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))

    def local_contours(self, p: dict, area: float) -> list[np.ndarray]:
        aspect = p["aspect"]
        bw, bh = math.sqrt(area * aspect), math.sqrt(area / aspect)
        return [np.array([(-bw, -bh), (bw, -bh), (bw, bh), (-bw, bh)]) / 2]

    def near_duplicate_direction(self, rng: np.random.Generator) -> float:
        return _along_an_axis(rng)


class Triangle(ShapeKind):
    name = "triangle"
    rotates = True
    near_duplicate_offset = (0.12, 0.30)

    def _draw_look(self, rng: np.random.Generator, p: dict) -> None:
        p["aspect"] = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
        p["apex"] = float(rng.uniform(0.2, 0.8))
        p["flip"] = bool(rng.random() < 0.5)

    def local_contours(self, p: dict, area: float) -> list[np.ndarray]:
        aspect = p["aspect"]
        bw, bh = math.sqrt(2 * area * aspect), math.sqrt(2 * area / aspect)
        apex_x = -bw / 2 + p["apex"] * bw
        pts = np.array([(apex_x, -bh / 2), (bw / 2, bh / 2), (-bw / 2, bh / 2)])
        if p["flip"]:
            pts[:, 1] *= -1
        return [pts]


class Cross(ShapeKind):
    """A vertical arm (arm_x of the width) over a horizontal arm (arm_y of the height)."""

    name = "cross"
    rotates = True
    near_duplicate_offset = (0.10, 0.25)

    def _draw_look(self, rng: np.random.Generator, p: dict) -> None:
        p["aspect"] = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        p["arm_x"] = float(rng.uniform(0.28, 0.42))
        p["arm_y"] = float(rng.uniform(0.28, 0.42))

    def local_contours(self, p: dict, area: float) -> list[np.ndarray]:
        aspect, ax, ay = p["aspect"], p["arm_x"], p["arm_y"]
        fill = ax + ay - ax * ay
        bw, bh = math.sqrt(area * aspect / fill), math.sqrt(area / aspect / fill)
        W, H, a, b = bw / 2, bh / 2, ax * bw / 2, ay * bh / 2
        return [np.array([(-a, -H), (a, -H), (a, -b), (W, -b), (W, b), (a, b), (a, H),
                          (-a, H), (-a, b), (-W, b), (-W, -b), (-a, -b)])]


class Ring(ShapeKind):
    """[outer, hole], filled even-odd; the segmentation joins them as one keyhole polygon so
    that the hole stays empty."""

    name = "ring"
    min_side = 14.0
    near_duplicate_offset = (0.10, 0.25)

    def _draw_look(self, rng: np.random.Generator, p: dict) -> None:
        p["hole"] = float(rng.uniform(0.45, 0.62))

    def local_contours(self, p: dict, area: float) -> list[np.ndarray]:
        hole = p["hole"]
        circle, radius = _circle(area, hole)
        return [circle * radius, circle * radius * hole]

    def outline(self, contours: list[np.ndarray]) -> np.ndarray:
        outer, inner = contours
        return np.concatenate([outer, outer[:1], inner[::-1], inner[-1:]])


# The order is the label order: category id = index + 1.
SHAPE_KINDS: tuple[ShapeKind, ...] = (Disc(), Rectangle(), Triangle(), Cross(), Ring())
CLASSES: tuple[str, ...] = tuple(kind.name for kind in SHAPE_KINDS)


@dataclass
class Shape:
    """One object's full geometry in continuous pixel coordinates (pixel i spans [i, i+1))."""

    label: int  # index into SHAPE_KINDS / CLASSES
    params: dict  # the kind's parameters, reused to draw near-duplicates
    contours: list  # list of (N, 2) float64 arrays; a ring is [outer, inner] (inner = hole)
    outline: np.ndarray  # (M, 2) the single polygon written as segmentation (ring: keyhole)
    _extent: Optional[tuple[float, float, float, float]] = None
    _area: Optional[float] = None

    @property
    def kind(self) -> ShapeKind:
        return SHAPE_KINDS[self.label]

    def extent(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the full shape, not clipped to the image."""
        if self._extent is None:
            pts = np.concatenate(self.contours)
            self._extent = (float(pts[:, 0].min()), float(pts[:, 1].min()),
                            float(pts[:, 0].max()), float(pts[:, 1].max()))
        return self._extent

    def area(self) -> float:
        """Geometric area enclosed (a ring's hole subtracted)."""
        if self._area is None:
            areas = [abs(_polygon_area(c)) for c in self.contours]
            self._area = areas[0] - sum(areas[1:])
        return self._area

    def moved(self, dx: float, dy: float) -> Shape:
        d = np.array([dx, dy])
        return Shape(self.label, self.params, [c + d for c in self.contours], self.outline + d)


def make_shape(label: int, params: dict, area: float, cx: float, cy: float,
               max_w: float, max_h: float) -> Shape:
    """The shape of class `label` with about `area` pixels, centred at (cx, cy), no wider
    than max_w and no taller than max_h."""
    kind = SHAPE_KINDS[label]
    contours = kind.local_contours(params, area)
    angle = math.radians(params.get("angle", 0.0))
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s], [s, c]])
        contours = [pts @ rot.T for pts in contours]
    pts = np.concatenate(contours)
    ext_w, ext_h = np.ptp(pts[:, 0]), np.ptp(pts[:, 1])
    shrink = min(1.0, max_w / ext_w, max_h / ext_h)
    grow = max(1.0, kind.min_side / min(ext_w, ext_h))
    scale = shrink if shrink < 1.0 else grow
    contours = [pts * scale + (cx, cy) for pts in contours]
    return Shape(label=label, params=params, contours=contours, outline=kind.outline(contours))


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
