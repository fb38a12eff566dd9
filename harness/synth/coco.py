"""Writes the synthetic dataset in COCO's layout: checks the arguments, splits the images
into train2017 / val2017, encodes the pictures and writes the annotation JSON files.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import UserError
from harness.synth.annotations import SIZE_NAMES, coco_annotation, size_name
from harness.synth.scene import render_scene
from harness.synth.shapes import CLASSES

_JPEG_QUALITY = 95
# Written into every file's "info"; it names the module that first wrote these datasets and
# stays as it is so that a seed keeps giving byte-identical files.
_CONTRIBUTOR = "harness.data.synth"


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
    images, seed, val_fraction = _checked_arguments(images, seed, val_fraction)
    out = Path(out)
    val_images = _val_images(images, val_fraction)
    train_images = images - val_images

    split_dirs = {"train2017": out / "train2017", "val2017": out / "val2017"}
    ann_dir = out / "annotations"
    for d in (*split_dirs.values(), ann_dir):
        _make_writable_dir(d, out)

    import cv2
    from tqdm import tqdm

    per_class = {name: 0 for name in CLASSES}
    per_size = {name: 0 for name in SIZE_NAMES}
    split_of = ["train2017"] * train_images + ["val2017"] * val_images
    docs = {split: {"images": [], "annotations": []} for split in split_dirs}
    ann_id = 0
    for index in tqdm(range(images), desc="synth", unit="img", disable=not progress):
        image_id = index + 1
        split = split_of[index]
        picture, placed = render_scene(np.random.default_rng([seed, index]))
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
            ann = coco_annotation(obj, ann_id, image_id, w, h)
            docs[split]["annotations"].append(ann)
            per_class[CLASSES[obj.shape.label]] += 1
            per_size[size_name(ann["area"])] += 1

    for split, doc in docs.items():
        _write_bytes(ann_dir / f"instances_{split}.json", _coco_json(split, seed, doc))

    return SynthSummary(
        out=out, train_images=train_images, val_images=val_images,
        train_annotations=len(docs["train2017"]["annotations"]),
        val_annotations=len(docs["val2017"]["annotations"]),
        per_class=per_class, per_size=per_size)


def _checked_arguments(images, seed, val_fraction) -> tuple[int, int, float]:
    """(images, seed, val_fraction) as int, int, float; UserError for what is out of range.
    Checked before anything is written."""
    if not isinstance(images, (int, np.integer)) or isinstance(images, bool) or images < 1:
        raise UserError(f"images must be a whole number >= 1, got {images!r}")
    try:
        fraction = float(val_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not (0.0 <= fraction < 1.0):
        raise UserError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed must be a whole number >= 0, got {seed!r}")
    return int(images), int(seed), fraction


def _val_images(images: int, val_fraction: float) -> int:
    """How many of the last images go to val2017: at least 1 when images >= 2 and
    val_fraction > 0, and never all of them."""
    val_images = int(round(images * val_fraction))
    if images >= 2 and val_fraction > 0:
        val_images = max(1, val_images)
    return min(val_images, images - 1) if images >= 2 else 0


def _coco_json(split: str, seed: int, doc: dict) -> bytes:
    """The instances file of one split: `doc` holds its "images" and "annotations"."""
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(CLASSES)]
    coco = {
        "info": {"description": f"harness synthetic shapes, {split}, seed {seed}",
                 "version": "1.0", "contributor": _CONTRIBUTOR, "url": "",
                 "year": 2025, "date_created": ""},
        "licenses": [{"id": 1, "name": "generated by harness, no restrictions", "url": ""}],
        "categories": categories,
        "images": doc["images"],
        "annotations": doc["annotations"],
    }
    return json.dumps(coco, sort_keys=True, separators=(",", ":")).encode("utf-8")


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
