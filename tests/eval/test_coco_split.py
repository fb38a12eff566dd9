"""Reading a COCO split: annotations found by COCO's layout, and every way a folder, its
annotation file and the model can disagree is one UserError line."""
from __future__ import annotations

import pytest

from harness.synth import CLASSES
from harness.errors import UserError
from harness.eval.coco_split import category_ids_for, find_annotations, open_split
from tests.eval.split_data import annotation_file, copy_split, edit_annotations


def one_line_error(fn, *needles):
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture
def copy(synth_val, tmp_path):
    return copy_split(synth_val, tmp_path / "coco")


def test_layout_count_and_categories(synth_val):
    assert find_annotations(synth_val) == annotation_file(synth_val)
    split = open_split(synth_val)
    assert len(split.images) == 12
    assert split.image_ids == sorted(split.image_ids)
    assert all(im.path.is_file() for im in split.images)
    assert open_split(synth_val, count=5).image_ids == split.image_ids[:5]
    ids = category_ids_for(split, CLASSES)
    names = {c["id"]: c["name"] for c in split.coco.dataset["categories"]}
    assert [names[i] for i in ids] == list(CLASSES)
    # a model with one more class than the file: that class has no category
    assert category_ids_for(split, (*CLASSES, "star"))[-1] == -1
    assert split.describe(unreadable=2) == {
        "images_dir": str(synth_val), "annotations": str(annotation_file(synth_val)),
        "images": 12, "unreadable": 2}


def test_no_annotation_file_by_layout(tmp_path):
    (tmp_path / "val2017").mkdir()
    one_line_error(lambda: open_split(tmp_path / "val2017"), "instances_val2017.json",
                   "--ann")


def test_missing_folder(tmp_path):
    one_line_error(lambda: open_split(tmp_path / "nope"), "image folder not found")


def test_malformed_json(copy):
    annotation_file(copy).write_text('{"images": [')
    one_line_error(lambda: open_split(copy), "not valid JSON")


def test_not_coco(copy):
    annotation_file(copy).write_text('{"images": []}')
    one_line_error(lambda: open_split(copy), "not COCO format")


def test_file_names_do_not_match_the_folder(copy):
    def rename(doc):
        for im in doc["images"][:3]:
            im["file_name"] = "elsewhere_" + im["file_name"]
    edit_annotations(copy, rename)
    one_line_error(lambda: open_split(copy), "3 of the 12 images", "elsewhere_",
                   "annotation file of this folder")


def test_annotations_of_unknown_image_ids(copy):
    def shift(doc):
        for a in doc["annotations"]:
            a["image_id"] += 1000
    edit_annotations(copy, shift)
    one_line_error(lambda: open_split(copy), "refer to image ids it does not list")


def test_duplicate_image_ids(copy):
    def dup(doc):
        doc["images"][1]["id"] = doc["images"][0]["id"]
    edit_annotations(copy, dup)
    one_line_error(lambda: open_split(copy), "more than once")


def test_more_categories_than_the_model(copy):
    def add(doc):
        doc["categories"].append({"id": 99, "name": "star", "supercategory": "shape"})
    edit_annotations(copy, add)
    split = open_split(copy)
    one_line_error(lambda: category_ids_for(split, CLASSES), "6 categories",
                   "model has 5 classes")


def test_category_names_that_differ(copy):
    def rename(doc):
        doc["categories"][0]["name"] = "circle"
    edit_annotations(copy, rename)
    split = open_split(copy)
    one_line_error(lambda: category_ids_for(split, CLASSES), "category 'circle'",
                   "not a class of the model")


def test_undeclared_category_ids(copy):
    def stray(doc):
        doc["annotations"][0]["category_id"] = 77
    edit_annotations(copy, stray)
    split = open_split(copy)
    one_line_error(lambda: category_ids_for(split, CLASSES), "category id 77")
