"""One COCO evaluation gives plain COCOeval's 12 numbers and per-class AP equal to a
single-class COCOeval; faster-coco-eval, where installed, gives the same numbers to 1e-4."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from harness.eval.coco import STAT_NAMES
from harness.eval.coco_scores import (
    evaluate, faster_coco_eval_installed, resolve_evaluator,
)
from harness.eval.coco_split import open_split
from harness.errors import UserError
from tests.eval.split_data import copy_split, edit_annotations


def noisy_detections(coco, seed: int = 0) -> list[dict]:
    """Ground truth boxes jittered, with random scores, some labels wrong, plus false
    positives: a result set with AP well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    cats = sorted(coco.cats)
    out = []
    for a in coco.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.15 else int(rng.choice(cats))
        out.append({"image_id": a["image_id"], "category_id": cat,
                    "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0),
                             max(h + jitter[3], 1.0)], "score": float(rng.random())})
    for image_id in coco.imgs:
        for _ in range(3):
            out.append({"image_id": image_id, "category_id": int(rng.choice(cats)),
                        "bbox": [float(v) for v in rng.uniform(0, 150, 4) + [0, 0, 10, 10]],
                        "score": float(rng.random() * 0.6)})
    return out


def plain_cocoeval(coco, results, image_ids, cat=None) -> list[float]:
    """pycocotools' COCOeval (bbox) as its README runs it, on one class when `cat` is given:
    its 12 summary numbers."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
        if cat is not None:
            ev.params.catIds = [cat]
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def single_class_ap(coco, results, cat: int, image_ids) -> float:
    return plain_cocoeval(coco, results, image_ids, cat)[0]


@pytest.fixture(scope="module")
def scored(synth_val):
    split = open_split(synth_val)
    results = noisy_detections(split.coco)
    names = {c["id"]: c["name"] for c in split.coco.dataset["categories"]}
    return split, results, names


def test_stats_equal_plain_cocoeval_and_per_class_equals_single_class_eval(scored):
    split, results, names = scored
    scores = evaluate(split.coco, results, split.image_ids, names)
    assert scores.evaluator == "pycocotools" and scores.seconds > 0
    assert scores.stats == dict(zip(STAT_NAMES, plain_cocoeval(split.coco, results,
                                                               split.image_ids)))
    assert 0.1 < scores.stats["AP"] < 0.95
    assert set(scores.per_class) == set(names.values())
    for cat, name in names.items():
        assert scores.per_class[name] == pytest.approx(
            single_class_ap(split.coco, results, cat, split.image_ids), abs=1e-12)


def test_class_without_ground_truth_is_none_and_no_results_is_zero(synth_val, tmp_path):
    val = copy_split(synth_val, tmp_path / "coco")

    def drop_rings(doc):
        ring = next(c["id"] for c in doc["categories"] if c["name"] == "ring")
        doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] != ring]
    edit_annotations(val, drop_rings)
    split = open_split(val)
    names = {c["id"]: c["name"] for c in split.coco.dataset["categories"]}
    scores = evaluate(split.coco, noisy_detections(split.coco), split.image_ids, names)
    assert scores.per_class["ring"] is None
    assert scores.per_class["disc"] is not None
    empty = evaluate(split.coco, [], split.image_ids, names)
    assert all(v == 0.0 for v in empty.stats.values()) and set(empty.stats) == set(STAT_NAMES)
    assert empty.per_class["ring"] is None and empty.per_class["disc"] == 0.0


def test_evaluator_choice():
    assert resolve_evaluator("pycocotools") == "pycocotools"
    expected = "faster-coco-eval" if faster_coco_eval_installed() else "pycocotools"
    assert resolve_evaluator("auto") == expected
    with pytest.raises(UserError):
        resolve_evaluator("detectron2")
    if not faster_coco_eval_installed():
        with pytest.raises(UserError, match="not installed"):
            resolve_evaluator("faster-coco-eval")


def test_faster_coco_eval_gives_the_same_numbers(scored):
    if not faster_coco_eval_installed():
        pytest.skip("faster_coco_eval is not installed (pip install faster-coco-eval); "
                    "nothing to compare pycocotools with")
    split, results, names = scored
    reference = evaluate(split.coco, results, split.image_ids, names, "pycocotools")
    faster = evaluate(split.coco, results, split.image_ids, names, "faster-coco-eval")
    assert faster.evaluator == "faster-coco-eval"
    for key in STAT_NAMES:
        assert faster.stats[key] == pytest.approx(reference.stats[key], abs=1e-4), key
    for name, ap in reference.per_class.items():
        assert faster.per_class[name] == pytest.approx(ap, abs=1e-4), name
