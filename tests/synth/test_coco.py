"""The synthetic COCO dataset: layout, determinism, the variety the fixture model and the NMS
comparisons rely on, and the errors a user can fix."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from harness.synth import CLASSES, SynthSummary, generate_synthetic_coco
from harness.errors import UserError

SPLITS = ("train2017", "val2017")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "coco"
    return out, generate_synthetic_coco(out, images=100, seed=0)


def _load(out: Path, split: str) -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def _all_annotations(out: Path) -> list[dict]:
    return [a for split in SPLITS for a in _load(out, split)["annotations"]]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _iou(a: list[float], b: list[float]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_pycocotools_loads_both_splits_and_counts_match_summary(dataset):
    from pycocotools.coco import COCO

    out, summary = dataset
    train = COCO(str(out / "annotations" / "instances_train2017.json"))
    val = COCO(str(out / "annotations" / "instances_val2017.json"))
    assert (len(train.imgs), len(val.imgs)) == (summary.train_images, summary.val_images) == (80, 20)
    assert len(train.anns) == summary.train_annotations
    assert len(val.anns) == summary.val_annotations
    assert [train.cats[i]["name"] for i in sorted(train.cats)] == list(CLASSES)
    assert {c["supercategory"] for c in train.cats.values()} == {"shape"}
    assert sum(summary.per_class.values()) == sum(summary.per_size.values()) == summary.annotations
    for coco in (train, val):
        for ann in coco.anns.values():
            assert ann["iscrowd"] == 0
            assert coco.annToMask(ann).any()  # the polygon rasterises


def test_files_follow_coco_layout_and_match_their_entries(dataset):
    import cv2

    out, _ = dataset
    ids = []
    for split in SPLITS:
        doc = _load(out, split)
        assert {"info", "licenses", "images", "annotations", "categories"} <= doc.keys()
        on_disk = sorted(p.name for p in (out / split).glob("*.jpg"))
        assert on_disk == sorted(im["file_name"] for im in doc["images"])
        for im in doc["images"]:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            h, w = cv2.imread(str(out / split / im["file_name"])).shape[:2]
            assert (w, h) == (im["width"], im["height"])
            ids.append(im["id"])
    assert len(ids) == len(set(ids)) == 100


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = _tree_hashes(Path(generate_synthetic_coco(tmp_path / "a", images=12, seed=7).out))
    b = _tree_hashes(Path(generate_synthetic_coco(tmp_path / "b", images=12, seed=7).out))
    c = _tree_hashes(Path(generate_synthetic_coco(tmp_path / "c", images=12, seed=8).out))
    assert len(a) == 12 + 2
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k] != c[k]]
    assert len(differing) == len(a)  # every image and both annotation files


def test_an_image_depends_only_on_seed_and_index(tmp_path):
    small = generate_synthetic_coco(tmp_path / "small", images=5, seed=3, val_fraction=0.0)
    large = generate_synthetic_coco(tmp_path / "large", images=9, seed=3, val_fraction=0.0)
    for i in range(1, 6):
        name = f"train2017/{i:012d}.jpg"
        assert (small.out / name).read_bytes() == (large.out / name).read_bytes()


def test_all_coco_size_ranges_and_classes_are_present(dataset):
    out, summary = dataset
    areas = np.array([a["area"] for a in _all_annotations(out)])
    assert (areas < 32 ** 2).sum() == summary.per_size["small"] > 0
    assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).sum() == summary.per_size["medium"] > 0
    assert (areas >= 96 ** 2).sum() == summary.per_size["large"] > 0
    shares = np.array([summary.per_size[k] for k in ("small", "medium", "large")])
    assert (shares / shares.sum() > 0.12).all()  # a mix, not one size with a few strays
    assert all(summary.per_class[name] > 0 for name in CLASSES)


def test_boxes_lie_inside_their_images_and_objects_stay_half_visible(dataset):
    out, _ = dataset
    for split in SPLITS:
        doc = _load(out, split)
        sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            iw, ih = sizes[ann["image_id"]]
            assert w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= iw + 1e-6 and y + h <= ih + 1e-6
            assert min(w, h) >= 5  # nothing degenerate, even when cut by the border
            # visible pixels vs the (clipped) outline's area: never more than half hidden
            poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            px, py = poly[:, 0], poly[:, 1]
            outline_area = 0.5 * abs(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1)))
            assert ann["area"] >= 0.499 * outline_area
            # coverage is sampled on 8 rows a pixel: up to 1/16 px off at each edge
            assert ann["area"] <= w * h + (w + h) / 8


def test_ring_segmentation_keeps_its_hole(dataset):
    from pycocotools.coco import COCO

    out, _ = dataset
    coco = COCO(str(out / "annotations" / "instances_train2017.json"))
    ring, disc = CLASSES.index("ring") + 1, CLASSES.index("disc") + 1
    checked = {ring: 0, disc: 0}
    for ann in coco.anns.values():
        if ann["category_id"] not in checked:
            continue
        x, y, w, h = ann["bbox"]
        img = coco.imgs[ann["image_id"]]
        if x <= 0 or y <= 0 or x + w >= img["width"] or y + h >= img["height"]:
            continue  # cut by the border: centre of the box is not the shape's centre
        centre = coco.annToMask(ann)[int(y + h / 2), int(x + w / 2)]
        assert centre == (0 if ann["category_id"] == ring else 1)
        checked[ann["category_id"]] += 1
    assert min(checked.values()) > 0


def test_near_duplicates_give_nms_work(dataset):
    out, _ = dataset
    by_image: dict[int, list[dict]] = {}
    for ann in _all_annotations(out):
        by_image.setdefault(ann["image_id"], []).append(ann)
    same, other = [], []
    for anns in by_image.values():
        for a, b in itertools.combinations(anns, 2):
            iou = _iou(a["bbox"], b["bbox"])
            (same if a["category_id"] == b["category_id"] else other).append(iou)
    assert max(same) >= 0.4
    assert sum(v >= 0.4 for v in same) >= 5
    assert sum(v >= 0.3 for v in other) >= 5  # heavy overlaps across classes too
    counts = [len(v) for v in by_image.values()]
    assert min(counts) >= 1 and max(counts) <= 8 and max(counts) >= 6


def test_image_sizes_and_aspects_vary(dataset):
    out, _ = dataset
    sizes = [(im["width"], im["height"]) for s in SPLITS for im in _load(out, s)["images"]]
    assert len(set(sizes)) > 50
    assert all(224 <= w <= 512 and 224 <= h <= 512 for w, h in sizes)
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.65 and max(aspects) > 1.6


@pytest.mark.parametrize("images, val_fraction, expected_val", [
    (10, 0.2, 2), (2, 0.2, 1), (1, 0.2, 0), (7, 0.0, 0), (5, 0.5, 2)])
def test_val_split_size(tmp_path, images, val_fraction, expected_val):
    s = generate_synthetic_coco(tmp_path, images=images, seed=1, val_fraction=val_fraction)
    assert (s.train_images, s.val_images) == (images - expected_val, expected_val)
    assert len(list((tmp_path / "val2017").glob("*.jpg"))) == expected_val


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    generate_synthetic_coco(tmp_path, images=2, seed=0, progress=True)
    assert "synth" in capsys.readouterr().err


def test_output_under_a_file_is_a_user_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(UserError, match="not-a-folder"):
        generate_synthetic_coco(blocker / "coco", images=2, seed=0)
    with pytest.raises(UserError):
        generate_synthetic_coco(blocker, images=2, seed=0)


def test_permission_denied_output_is_a_user_error(tmp_path, monkeypatch):
    # Root ignores read-only modes, so the refusal is simulated where the OS would raise it.
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if "locked" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UserError, match="locked"):
        generate_synthetic_coco(tmp_path / "locked" / "coco", images=2, seed=0)


@pytest.mark.parametrize("kwargs", [
    {"images": 0}, {"images": -3}, {"images": 2.5}, {"val_fraction": 1.0},
    {"val_fraction": -0.1}, {"val_fraction": float("nan")}, {"val_fraction": "a lot"},
    {"seed": -1},
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
    args = {"images": 4, "seed": 0, **kwargs}
    with pytest.raises(UserError):
        generate_synthetic_coco(tmp_path / "coco", **args)
    assert not (tmp_path / "coco").exists()  # checked before anything is written
