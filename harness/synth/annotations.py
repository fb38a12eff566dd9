"""One placed object as a COCO annotation: its box clipped to the image, its visible area,
its outline polygon clipped to the image, and the COCO size range that area falls in.
"""
from __future__ import annotations

import numpy as np

from harness.synth.occlusion import Placed

# COCO's area ranges (pycocotools COCOeval.Params.areaRng): small < 32², medium < 96².
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
_MEDIUM_MIN_AREA = 32 ** 2
_LARGE_MIN_AREA = 96 ** 2


def coco_annotation(obj: Placed, ann_id: int, image_id: int, w: int, h: int) -> dict:
    """The annotation dict of `obj` in an image w × h (see generate_synthetic_coco)."""
    x0, y0, x1, y1 = obj.shape.extent()
    # clip, then round the corners (not the sizes) so that x + w never passes the border
    x0, y0 = round(max(0.0, x0), 2), round(max(0.0, y0), 2)
    x1, y1 = round(min(float(w), x1), 2), round(min(float(h), y1), 2)
    outline = clip_polygon(obj.shape.outline, float(w), float(h))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.shape.label + 1,
        "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
        "area": round(obj.visible_area, 2),
        "iscrowd": 0,
        "segmentation": [np.round(outline.reshape(-1), 2).tolist()],
    }


def size_name(area: float) -> str:
    """COCO's size range ("small" / "medium" / "large") of an area in pixels."""
    if area < _MEDIUM_MIN_AREA:
        return "small"
    if area < _LARGE_MIN_AREA:
        return "medium"
    return "large"


def clip_polygon(poly: np.ndarray, w: float, h: float) -> np.ndarray:
    """Sutherland–Hodgman clip of a polygon (N, 2) to [0, w] × [0, h]."""
    if poly[:, 0].min() >= 0 and poly[:, 1].min() >= 0 and poly[:, 0].max() <= w \
            and poly[:, 1].max() <= h:
        return poly
    pts = [tuple(p) for p in poly]
    # each edge: (axis, bound, keep points with coord >= bound if True else <= bound)
    for axis, bound, keep_ge in ((0, 0.0, True), (0, w, False), (1, 0.0, True), (1, h, False)):
        if not pts:
            break
        inside = (lambda p: p[axis] >= bound) if keep_ge else (lambda p: p[axis] <= bound)
        clipped = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur):
                if not inside(prev):
                    clipped.append(_cross_at(prev, cur, axis, bound))
                clipped.append(cur)
            elif inside(prev):
                clipped.append(_cross_at(prev, cur, axis, bound))
        pts = clipped
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def _cross_at(a, b, axis: int, bound: float) -> tuple[float, float]:
    t = (bound - a[axis]) / (b[axis] - a[axis])
    p = [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])]
    p[axis] = bound
    return (p[0], p[1])
