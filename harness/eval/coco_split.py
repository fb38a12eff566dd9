"""A COCO split as the `coco` command uses it: the image folder, its annotation file (found by
COCO's layout `<split>/../annotations/instances_<split>.json` unless given), the images to
evaluate, and the mapping of the model's class indices to the file's category ids. Every
mismatch between folder, file and model is a one-line UserError before anything runs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

from harness.errors import UserError


@dataclass(frozen=True)
class SplitImage:
    """One image of the split; width / height as the annotation file records them (what
    mmdet's dataset and mmyolo's BatchShapePolicy read); batch_shape (h, w): the rectangle
    it is letterboxed to when a row evaluates with batch shapes, else None."""

    image_id: int
    file_name: str
    path: Path
    width: int = 0
    height: int = 0
    position: int = 0  # where the annotation file lists it (mmdet's dataset order)
    batch_shape: Union[tuple[int, int], None] = None


@dataclass
class CocoSplit:
    """images: what is evaluated (sorted by id, the first `count`); coco: pycocotools COCO."""

    images_dir: Path
    annotations: Path
    coco: Any
    images: list[SplitImage]

    @property
    def image_ids(self) -> list[int]:
        return [im.image_id for im in self.images]

    def describe(self, unreadable: int = 0) -> dict[str, Any]:
        return {"images_dir": str(self.images_dir), "annotations": str(self.annotations),
                "images": len(self.images), "unreadable": unreadable}


def find_annotations(images_dir: Path) -> Path:
    """COCO's layout: `val2017/` → `../annotations/instances_val2017.json`."""
    ann = images_dir.parent / "annotations" / f"instances_{images_dir.name}.json"
    if not ann.is_file():
        raise UserError(f"no annotation file for {images_dir}: expected {ann} (COCO layout); "
                        "pass --ann FILE")
    return ann


def open_split(images_dir: Union[str, Path], annotations: Union[str, Path, None] = None,
               count: int = 0) -> CocoSplit:
    """Read and check the split. count: 0 = every image, else the first `count` by id."""
    from harness.eval.coco import load_coco

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UserError(f"image folder not found: {images_dir}")
    if count < 0:
        raise UserError(f"--count must be 0 (every image) or more, got {count}")
    ann = Path(annotations) if annotations is not None else find_annotations(images_dir)
    coco = load_coco(ann)
    entries = coco.dataset["images"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"annotation file {ann} lists no images")
    try:
        pairs = [(int(im["id"]), str(im["file_name"])) for im in entries]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"annotation file {ann}: every image needs an integer 'id' and a "
                        "'file_name'") from None
    dup = [i for i, n in Counter(i for i, _ in pairs).items() if n > 1]
    if dup:
        raise UserError(f"annotation file {ann} lists image id {dup[0]} more than once")
    known = {i for i, _ in pairs}
    stray = [a.get("image_id") for a in coco.dataset["annotations"]
             if a.get("image_id") not in known]
    if stray:
        raise UserError(f"annotation file {ann}: {len(stray)} annotations refer to image ids "
                        f"it does not list (first: {stray[0]})")
    sizes = {int(im["id"]): (int(im.get("width") or 0), int(im.get("height") or 0),
                             position) for position, im in enumerate(entries)}
    images = [SplitImage(i, name, images_dir / name, *sizes[i]) for i, name in sorted(pairs)]
    if count:
        images = images[:count]
    missing = [im for im in images if not im.path.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(images)} images that {ann.name} lists are "
                        f"not in {images_dir} (first: {missing[0].file_name}); is it the "
                        "annotation file of this folder?")
    return CocoSplit(images_dir=images_dir, annotations=ann, coco=coco, images=images)


def category_ids_for(split: CocoSplit, class_names: Sequence[str]) -> list[int]:
    """The file's category id for each of the model's classes, matched by name.

    Every category of the file must be a class of the model (else AP would count classes the
    model can never detect); model classes the file lacks get id -1 (their detections are
    dropped).
    """
    cats = sorted(split.coco.dataset["categories"], key=lambda c: c.get("id", 0))
    try:
        by_name = {str(c["name"]): int(c["id"]) for c in cats}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"annotation file {split.annotations}: every category needs an "
                        "integer 'id' and a 'name'") from None
    if len(by_name) > len(class_names):
        raise UserError(f"annotation file {split.annotations} has {len(by_name)} categories "
                        f"but the model has {len(class_names)} classes "
                        f"({', '.join(class_names)})")
    unknown = [n for n in by_name if n not in class_names]
    if unknown:
        raise UserError(f"category '{unknown[0]}' of {split.annotations.name} is not a class "
                        f"of the model (its classes: {', '.join(class_names)}); evaluate with "
                        "the model trained on these categories")
    used = {a.get("category_id") for a in split.coco.dataset["annotations"]}
    undeclared = sorted((c for c in used - set(by_name.values()) if c is not None), key=str)
    if undeclared:
        raise UserError(f"annotation file {split.annotations}: annotations use category id "
                        f"{undeclared[0]}, which its categories do not declare")
    return [by_name.get(name, -1) for name in class_names]
