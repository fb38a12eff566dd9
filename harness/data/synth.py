"""A deterministic synthetic COCO-format detection dataset: five simple shape classes on
cluttered, noisy backgrounds, small enough that a tiny detector learns it on a CPU and rich
enough (sizes, aspects, near-duplicates, occlusion, truncation) to give NMS and letterboxing
real work. Used to train the test fixture model, by tests and by `harness demo`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Optional

import numpy as np

from harness.errors import UserError

CLASSES: tuple[str, ...] = ("disc", "rectangle", "triangle", "cross", "ring")

# COCO's area ranges (pycocotools COCOeval.Params.areaRng): small < 32², medium < 96².
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
_MEDIUM_MIN_AREA = 32 ** 2
_LARGE_MIN_AREA = 96 ** 2

# Image geometry: both sides within [224, 512], aspect w/h within [0.5, 2].
_SIDE_MIN, _SIDE_MAX = 224, 512
_ASPECT_MIN, _ASPECT_MAX = 0.5, 2.0

# Target shape area per size class, as ranges of sqrt(area) in pixels, and how often each is
# drawn. The ranges keep clear of the 32 / 96 borders so that occlusion (which lowers the
# visible area written to the file) moves few objects across them; the probabilities are set
# so the *written* mix is about 30 / 45 / 25 %.
_SIZE_SQRT_RANGES = ((12.0, 30.0), (35.0, 90.0), (106.0, 180.0))
_SIZE_PROBS = (0.28, 0.42, 0.30)
_MIN_SIDE = 10.0  # no object narrower than this, in pixels

_MIN_VISIBLE = 0.5  # every annotated object keeps at least half its area visible
_MIN_INSIDE = 0.6  # a truncated object keeps at least this much inside the image
_PLACEMENT_TRIES = 20  # random places tried for an object before it is left out
_PAIR_TRIES = 20  # offsets tried for a near-duplicate or overlapping partner
_SUPERSAMPLE = 8  # coverage rows sampled per pixel row
_JPEG_QUALITY = 95
_NORMAL_QUANTILES = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)],
                             dtype=np.float32)


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_synthetic_coco` wrote (counts over both splits unless named)."""

    out: Path
    train_images: int
    val_images: int
    train_annotations: int
    val_annotations: int
    per_class: dict[str, int] = field(default_factory=dict)  # class name → annotations
    per_size: dict[str, int] = field(default_factory=dict)  # small / medium / large → annotations

    @property
    def annotations(self) -> int:
        return self.train_annotations + self.val_annotations


@dataclass
class _Shape:
    """One object's full geometry in continuous pixel coordinates (pixel i spans [i, i+1))."""

    label: int  # index into CLASSES
    params: dict  # class-specific parameters, reused to draw near-duplicates
    contours: list  # list of (N, 2) float64 arrays; a ring is [outer, inner] (inner = hole)
    outline: np.ndarray  # (M, 2) the single polygon written as segmentation (ring: keyhole)
    _extent: Optional[tuple[float, float, float, float]] = None
    _area: Optional[float] = None

    def extent(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the full shape, not clipped to the image."""
        if self._extent is None:
            pts = np.concatenate(self.contours)
            self._extent = (float(pts[:, 0].min()), float(pts[:, 1].min()),
                            float(pts[:, 0].max()), float(pts[:, 1].max()))
        return self._extent


@dataclass
class _Placed:
    """A drawn object and how much of it still shows, as alpha compositing decides: at each
    pixel its coverage times (1 - coverage) of every object drawn over it."""

    shape: _Shape
    full_area: float  # coverage summed over the whole shape, inside the image or not
    x0: int  # where `visible` lies in the image
    y0: int
    visible: np.ndarray  # (h, w) float32, the part of each pixel still showing this object
    visible_area: float  # visible.sum()


def generate_synthetic_coco(out: Path, images: int, seed: int, val_fraction: float = 0.2,
                            progress: bool = False) -> SynthSummary:
    """Write a synthetic detection dataset in COCO's layout under `out`.

    Layout: ``out/train2017/*.jpg``, ``out/val2017/*.jpg``,
    ``out/annotations/instances_{train,val}2017.json``. Image ids run 1..images (train first,
    then the last ``round(images * val_fraction)`` as val, at least 1 when images >= 2); file
    names are the 12-digit zero-padded id. Picture i depends only on (seed, i), so the same
    seed gives byte-identical files (images and JSON), and picture i is the same whatever
    `images` is (only the split it lands in may change).

    Annotations: ``bbox`` is the tight box of the object's full geometric extent (occluded
    parts included), clipped to the image, ``[x, y, w, h]`` in pixels (pixel i spans [i, i+1)).
    ``area`` is the object's *visible mask area* in pixels: its anti-aliased coverage inside
    the image, less what objects drawn later cover (alpha compositing), like COCO's area of
    the visible mask; pycocotools' small / medium / large split uses it, and so does
    SynthSummary.per_size. Every object keeps at least half of its area visible.
    ``segmentation`` is one polygon of the full shape outline clipped to the image (a ring is
    one keyhole polygon, so its hole stays empty); it does not cut out occluded parts.
    ``iscrowd`` is 0.

    Existing files of the same names are overwritten; other files under `out` are left alone.

    Raises UserError when images < 1, val_fraction is outside [0, 1), seed is negative, or
    `out` cannot be created or written.
    """
    if not isinstance(images, (int, np.integer)) or isinstance(images, bool) or images < 1:
        raise UserError(f"images must be a whole number >= 1, got {images!r}")
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not (0.0 <= fraction < 1.0):
        raise UserError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    val_fraction = fraction
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed must be a whole number >= 0, got {seed!r}")
    images, seed = int(images), int(seed)
    out = Path(out)

    val_images = int(round(images * val_fraction))
    if images >= 2 and val_fraction > 0:
        val_images = max(1, val_images)
    val_images = min(val_images, images - 1) if images >= 2 else 0
    train_images = images - val_images

    split_dirs = {"train2017": out / "train2017", "val2017": out / "val2017"}
    ann_dir = out / "annotations"
    for d in (*split_dirs.values(), ann_dir):
        _make_writable_dir(d, out)

    import cv2
    from tqdm import tqdm

    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(CLASSES)]
    per_class = {name: 0 for name in CLASSES}
    per_size = {name: 0 for name in SIZE_NAMES}
    split_of = ["train2017"] * train_images + ["val2017"] * val_images
    docs = {split: {"images": [], "annotations": []} for split in split_dirs}
    ann_id = 0
    for index in tqdm(range(images), desc="synth", unit="img", disable=not progress):
        image_id = index + 1
        split = split_of[index]
        picture, placed = _render_image(np.random.default_rng([seed, index]))
        h, w = picture.shape[:2]
        file_name = f"{image_id:012d}.jpg"
        ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:  # pragma: no cover - cv2 built without JPEG support
            raise RuntimeError("cv2.imencode could not write JPEG")
        _write_bytes(split_dirs[split] / file_name, encoded.tobytes())
        docs[split]["images"].append(
            {"id": image_id, "file_name": file_name, "width": w, "height": h})
        for obj in placed:
            ann_id += 1
            ann = _annotation(obj, ann_id, image_id, w, h)
            docs[split]["annotations"].append(ann)
            per_class[CLASSES[obj.shape.label]] += 1
            per_size[_size_name(ann["area"])] += 1

    for split, doc in docs.items():
        coco = {
            "info": {"description": f"harness synthetic shapes, {split}, seed {seed}",
                     "version": "1.0", "contributor": "harness.data.synth", "url": "",
                     "year": 2025, "date_created": ""},
            "licenses": [{"id": 1, "name": "generated by harness, no restrictions", "url": ""}],
            "categories": categories,
            "images": doc["images"],
            "annotations": doc["annotations"],
        }
        text = json.dumps(coco, sort_keys=True, separators=(",", ":"))
        _write_bytes(ann_dir / f"instances_{split}.json", text.encode("utf-8"))

    return SynthSummary(
        out=out, train_images=train_images, val_images=val_images,
        train_annotations=len(docs["train2017"]["annotations"]),
        val_annotations=len(docs["val2017"]["annotations"]),
        per_class=per_class, per_size=per_size)


def _size_name(area: float) -> str:
    if area < _MEDIUM_MIN_AREA:
        return "small"
    if area < _LARGE_MIN_AREA:
        return "medium"
    return "large"


def _make_writable_dir(d: Path, out: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot create {d}: a file of that name is in the way; "
                        f"choose another output folder than {out}") from None
    except NotADirectoryError:
        raise UserError(f"cannot create {d}: part of {out} is a file, not a folder; "
                        "choose another output folder") from None
    except OSError as e:
        raise UserError(f"cannot create {d} ({e.strerror}); choose a writable output "
                        "folder") from None
    probe = d / ".harness-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write into {d} ({e.strerror}); choose a writable output "
                        "folder or fix its permissions") from None


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); choose a writable output "
                        "folder with free space") from None


def _annotation(obj: _Placed, ann_id: int, image_id: int, w: int, h: int) -> dict:
    x0, y0, x1, y1 = obj.shape.extent()
    # clip, then round the corners (not the sizes) so that x + w never passes the border
    x0, y0 = round(max(0.0, x0), 2), round(max(0.0, y0), 2)
    x1, y1 = round(min(float(w), x1), 2), round(min(float(h), y1), 2)
    outline = _clip_polygon(obj.shape.outline, float(w), float(h))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.shape.label + 1,
        "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
        "area": round(obj.visible_area, 2),
        "iscrowd": 0,
        "segmentation": [np.round(outline.reshape(-1), 2).tolist()],
    }


def _clip_polygon(poly: np.ndarray, w: float, h: float) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Rendering one image


def _render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[_Placed]]:
    """One picture (H, W, 3) uint8 BGR and its objects, drawn from `rng` alone."""
    import cv2

    w, h = _image_size(rng)
    canvas = _background(rng, w, h)
    for _ in range(int(rng.integers(3, 11))):
        _draw_distractor(rng, canvas)

    placed: list[_Placed] = []
    for _ in range(int(rng.integers(1, 9))):
        kind = rng.random()
        # only an object that still shows nearly all of itself can have another put over it
        anchors = [p.shape for p in placed if p.visible_area >= 0.9 * p.full_area]
        if anchors and kind < 0.36:
            anchor = anchors[int(rng.integers(len(anchors)))]
            make_partner = _near_duplicate if kind < 0.22 else _overlapping_other
            if any(_try_place(rng, canvas, placed, make_partner(rng, anchor, attempt))
                   for attempt in range(_PAIR_TRIES)):
                continue
        # size and look fixed once, so that retries move the object rather than shrink it
        label = int(rng.integers(len(CLASSES)))
        base = _make_shape(label, _random_params(rng, label), _target_area(rng), 0.0, 0.0,
                           0.9 * w, 0.9 * h)
        any(_try_place(rng, canvas, placed, _placed_anywhere(rng, base, w, h))
            for _ in range(_PLACEMENT_TRIES))

    # a few thin strokes over everything, as real clutter crosses objects too
    for _ in range(int(rng.integers(0, 3))):
        _draw_distractor(rng, canvas, kinds=("line", "dots"))

    if rng.random() < 0.2:
        sigma = float(rng.uniform(0.5, 1.0))
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    # Gaussian pixel noise through a 256-level quantile table: a full-size standard_normal
    # draw costs more than everything else in the picture together
    levels = rng.integers(0, 256, canvas.shape, dtype=np.uint8)
    canvas = cv2.scaleAdd(cv2.LUT(levels, _NORMAL_QUANTILES), float(rng.uniform(2.0, 8.0)),
                          canvas)
    return cv2.convertScaleAbs(np.maximum(canvas, 0, out=canvas)), placed


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(_ASPECT_MIN), math.log(_ASPECT_MAX)))  # w / h
    ratio = max(aspect, 1.0 / aspect)
    long_side = rng.uniform(max(_SIDE_MIN * ratio, 288.0), _SIDE_MAX)
    short_side = max(float(_SIDE_MIN), long_side / ratio)
    if aspect >= 1.0:
        return int(round(long_side)), int(round(short_side))
    return int(round(short_side)), int(round(long_side))


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) float32: a two-colour linear gradient plus smooth low-frequency texture.

    Both are smooth, so they are built on a coarse grid and enlarged: cubic to a quarter of
    the size, then linear (a full-size cubic resize costs as much as the rest of the image).
    """
    import cv2

    c0 = rng.uniform(20, 235, 3).astype(np.float32)
    c1 = rng.uniform(20, 235, 3).astype(np.float32)
    cell = float(rng.uniform(24, 64))
    gw, gh = max(2, int(w / cell) + 2), max(2, int(h / cell) + 2)
    grid = c0 + (c1 - c0) * _ramp(rng, gw, gh)[..., None]
    grid += rng.standard_normal((gh, gw, 1), dtype=np.float32) * np.float32(rng.uniform(6, 18))
    grid += rng.standard_normal((gh, gw, 3), dtype=np.float32) * np.float32(rng.uniform(2, 8))
    grid = cv2.resize(grid, ((w + 3) // 4, (h + 3) // 4), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)


def _ramp(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w) float32 in [0, 1], linear along a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(w, dtype=np.float32) * np.float32(math.cos(angle))
    ys = np.arange(h, dtype=np.float32) * np.float32(math.sin(angle))
    t = ys[:, None] + xs[None, :]
    t -= t.min()
    return t / max(float(t.max()), 1e-6)


def _draw_distractor(rng: np.random.Generator, canvas: np.ndarray,
                     kinds: tuple[str, ...] = ("line", "scribble", "dots", "blob")) -> None:
    """Clutter that is clearly none of CLASSES: thin strokes, tiny dots, very soft blobs."""
    import cv2

    h, w = canvas.shape[:2]
    kind = kinds[int(rng.integers(len(kinds)))]
    colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
    if kind == "line":
        p = rng.uniform((0, 0), (w, h))
        length, angle = rng.uniform(20, 0.6 * max(w, h)), rng.uniform(0, 2 * math.pi)
        q = p + length * np.array([math.cos(angle), math.sin(angle)])
        cv2.line(canvas, _fixed(p), _fixed(q), colour, int(rng.integers(1, 3)), cv2.LINE_AA,
                 shift=4)
    elif kind == "scribble":
        steps = int(rng.integers(5, 16))
        heading = rng.uniform(0, 2 * math.pi)
        pts = [rng.uniform((0, 0), (w, h))]
        for _ in range(steps):
            heading += rng.normal(0, 0.9)
            pts.append(pts[-1] + rng.uniform(4, 14) * np.array([math.cos(heading),
                                                                math.sin(heading)]))
        poly = np.round((np.asarray(pts) - 0.5) * 16).astype(np.int32)
        cv2.polylines(canvas, [poly], False, colour, 1, cv2.LINE_AA, shift=4)
    elif kind == "dots":
        centre = rng.uniform((0, 0), (w, h))
        for _ in range(int(rng.integers(3, 12))):
            p = centre + rng.normal(0, 20, 2)
            cv2.circle(canvas, _fixed(p), int(rng.uniform(1.0, 2.5) * 16), colour, -1,
                       cv2.LINE_AA, shift=4)
    else:  # blob: a faint Gaussian smudge, no edge to mistake for a disc
        sx, sy = rng.uniform(5, 20, 2)
        angle = rng.uniform(0, math.pi)
        r = int(3 * max(sx, sy)) + 1
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
        c, s = math.cos(angle), math.sin(angle)
        u, v = (xx * c + yy * s) / sx, (yy * c - xx * s) / sy
        layer = np.exp(-0.5 * (u * u + v * v)) * np.float32(rng.uniform(0.25, 0.6))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        _blend(canvas, layer, cx - r, cy - r, np.array(colour, np.float32))


def _fixed(p) -> tuple[int, int]:
    """Continuous pixel coordinates → cv2 fixed-point (shift=4) point of the same place."""
    return int(round((p[0] - 0.5) * 16)), int(round((p[1] - 0.5) * 16))


def _blend(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int, fill: np.ndarray) -> None:
    """canvas = canvas·(1-α) + fill·α over the part of the layer at (x0, y0) inside canvas.

    fill: (3,) colour or (h, w, 3) image the size of `alpha`.
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


# ---------------------------------------------------------------------------------------------
# Shapes


def _target_area(rng: np.random.Generator) -> float:
    size = int(rng.choice(3, p=_SIZE_PROBS))
    lo, hi = _SIZE_SQRT_RANGES[size]
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) ** 2


def _random_params(rng: np.random.Generator, label: int) -> dict:
    """Class-specific shape parameters independent of size and position."""
    p: dict = {"angle": 0.0}
    name = CLASSES[label]
    if name in ("rectangle", "triangle", "cross") and rng.random() < 0.4:
        p["angle"] = float(rng.uniform(-30, 30))
    if name == "rectangle":
        p["aspect"] = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))
    elif name == "triangle":
        p["aspect"] = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
        p["apex"] = float(rng.uniform(0.2, 0.8))
        p["flip"] = bool(rng.random() < 0.5)
    elif name == "cross":
        p["aspect"] = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        p["arm_x"] = float(rng.uniform(0.28, 0.42))
        p["arm_y"] = float(rng.uniform(0.28, 0.42))
    elif name == "ring":
        p["hole"] = float(rng.uniform(0.45, 0.62))
    return p


def _make_shape(label: int, params: dict, area: float, cx: float, cy: float,
                max_w: float, max_h: float) -> _Shape:
    """The shape of class `label` with about `area` pixels, centred at (cx, cy), no wider
    than max_w and no taller than max_h."""
    name = CLASSES[label]
    contours = _local_contours(name, params, area)
    angle = math.radians(params.get("angle", 0.0))
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s], [s, c]])
        contours = [pts @ rot.T for pts in contours]
    pts = np.concatenate(contours)
    ext_w, ext_h = np.ptp(pts[:, 0]), np.ptp(pts[:, 1])
    shrink = min(1.0, max_w / ext_w, max_h / ext_h)
    grow = max(1.0, _min_side(name) / min(ext_w, ext_h))
    scale = shrink if shrink < 1.0 else grow
    contours = [pts * scale + (cx, cy) for pts in contours]
    if name == "ring":
        outer, inner = contours
        outline = np.concatenate([outer, outer[:1], inner[::-1], inner[-1:]])
    else:
        outline = contours[0]
    return _Shape(label=label, params=params, contours=contours, outline=outline)


def _min_side(name: str) -> float:
    return 14.0 if name == "ring" else _MIN_SIDE


def _local_contours(name: str, p: dict, area: float) -> list:
    """Contours centred on the origin, unrotated, enclosing about `area` pixels."""
    if name in ("disc", "ring"):
        hole = p.get("hole", 0.0)
        radius = math.sqrt(area / (math.pi * (1.0 - hole ** 2)))
        theta = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        circle = np.stack([np.cos(theta), np.sin(theta)], axis=1)
        if name == "disc":
            return [circle * radius]
        # [outer, hole]: filled even-odd; the segmentation joins them as a keyhole polygon
        return [circle * radius, circle * radius * hole]
    aspect = p["aspect"]
    if name == "rectangle":
        bw, bh = math.sqrt(area * aspect), math.sqrt(area / aspect)
        return [np.array([(-bw, -bh), (bw, -bh), (bw, bh), (-bw, bh)]) / 2]
    if name == "triangle":
        bw, bh = math.sqrt(2 * area * aspect), math.sqrt(2 * area / aspect)
        apex_x = -bw / 2 + p["apex"] * bw
        pts = np.array([(apex_x, -bh / 2), (bw / 2, bh / 2), (-bw / 2, bh / 2)])
        if p["flip"]:
            pts[:, 1] *= -1
        return [pts]
    # cross: a vertical arm (arm_x of the width) over a horizontal arm (arm_y of the height)
    ax, ay = p["arm_x"], p["arm_y"]
    fill = ax + ay - ax * ay
    bw, bh = math.sqrt(area * aspect / fill), math.sqrt(area / aspect / fill)
    W, H, a, b = bw / 2, bh / 2, ax * bw / 2, ay * bh / 2
    return [np.array([(-a, -H), (a, -H), (a, -b), (W, -b), (W, b), (a, b), (a, H), (-a, H),
                      (-a, b), (-W, b), (-W, -b), (-a, -b)])]


def _placed_anywhere(rng: np.random.Generator, shape: _Shape, w: int, h: int) -> _Shape:
    """`shape` (centred on the origin) moved to a random place: mostly fully inside the
    image, now and then cut by its border."""
    x0, y0, x1, y1 = shape.extent()
    slack = 0.35 if rng.random() < 0.1 else 0.0
    sw, sh = (x1 - x0) * slack, (y1 - y0) * slack
    cx = rng.uniform(-x0 - sw, w - x1 + sw)
    cy = rng.uniform(-y0 - sh, h - y1 + sh)
    return _moved(shape, cx, cy)


def _moved(shape: _Shape, dx: float, dy: float) -> _Shape:
    d = np.array([dx, dy])
    return _Shape(shape.label, shape.params, [c + d for c in shape.contours], shape.outline + d)


# Where a near-duplicate's offset (share of the anchor's size) starts. A ring's hole and a
# cross's gaps let a copy shifted by 10-25 % leave half of the anchor showing (box IoU about
# 0.5-0.7); a filled copy that close would hide more than half of it, so those start further
# out, shifted mostly along one axis, which keeps the box IoU highest (about 0.35-0.45).
_NEAR_DUPLICATE_OFFSET = {"disc": (0.30, 0.40), "rectangle": (0.34, 0.45),
                          "triangle": (0.12, 0.30), "cross": (0.10, 0.25), "ring": (0.10, 0.25)}


def _near_duplicate(rng: np.random.Generator, anchor: _Shape, attempt: int) -> _Shape:
    """Same class and look, scaled a little, shifted a little (more with each attempt, until
    the anchor stays half visible)."""
    name = CLASSES[anchor.label]
    params = dict(anchor.params)
    if params.get("angle"):
        params["angle"] = float(params["angle"] + rng.uniform(-8, 8))
    lo, hi = _NEAR_DUPLICATE_OFFSET[name]
    if name in ("disc", "rectangle"):
        direction = math.pi / 2 * int(rng.integers(4)) + rng.uniform(-0.3, 0.3)
    else:
        direction = rng.uniform(0, 2 * math.pi)
    return _offset_from(anchor, anchor.label, params, rng.uniform(0.8, 1.15),
                        rng.uniform(lo, hi) + 0.012 * attempt, direction)


def _overlapping_other(rng: np.random.Generator, anchor: _Shape, attempt: int) -> _Shape:
    """Another class over much of the anchor."""
    label = (anchor.label + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)
    return _offset_from(anchor, label, _random_params(rng, label), rng.uniform(0.5, 1.3),
                        rng.uniform(0.2, 0.4) + 0.012 * attempt, rng.uniform(0, 2 * math.pi))


def _offset_from(anchor: _Shape, label: int, params: dict, area_scale: float, offset: float,
                 direction: float) -> _Shape:
    """A shape of `label` with area_scale × the anchor's area, its centre moved from the
    anchor's by `offset` × the anchor's box size in `direction` (radians)."""
    x0, y0, x1, y1 = anchor.extent()
    cx = (x0 + x1) / 2 + offset * (x1 - x0) * math.cos(direction)
    cy = (y0 + y1) / 2 + offset * (y1 - y0) * math.sin(direction)
    return _make_shape(label, params, _shape_area(anchor) * area_scale, cx, cy, 1e9, 1e9)


def _shape_area(shape: _Shape) -> float:
    """Geometric area enclosed (a ring's hole subtracted)."""
    if shape._area is None:
        areas = [abs(_polygon_area(c)) for c in shape.contours]
        shape._area = areas[0] - sum(areas[1:])
    return shape._area


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# ---------------------------------------------------------------------------------------------
# Placement: occlusion bookkeeping, colour and drawing


def _rasterize(shape: _Shape) -> tuple[np.ndarray, int, int]:
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


def _try_place(rng: np.random.Generator, canvas: np.ndarray, placed: list[_Placed],
               shape: _Shape) -> bool:
    """Draw `shape` on top if it stays enough inside the image and leaves every earlier
    object at least _MIN_VISIBLE visible; otherwise change nothing and return False."""
    h, w = canvas.shape[:2]
    cover, ox, oy = _rasterize(shape)
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

    _blend(canvas, cover, ox, oy, _fill(rng, canvas, cover, ox, oy))
    for obj, under, over, loss in hides:
        under *= 1.0 - over
        obj.visible_area -= loss
    placed.append(_Placed(shape=shape, full_area=full, x0=x0, y0=y0,
                          visible=inside.copy(), visible_area=inside_area))
    return True


def _fill(rng: np.random.Generator, canvas: np.ndarray, alpha: np.ndarray, ox: int,
          oy: int) -> np.ndarray:
    """A colour, or (h, w, 3) gradient / texture, that stands out from what lies under and
    around the shape (background, clutter and earlier objects)."""
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
        t = _ramp(rng, aw, ah)[..., None]
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
