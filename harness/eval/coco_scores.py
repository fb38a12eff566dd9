"""One COCO box evaluation giving the 12 summary numbers and AP per class, through
pycocotools (which decides) or faster-coco-eval (the same computation in C++, used when it is
installed and asked for: it must give the same numbers, see tests/eval/test_coco_scores.py).

The 12 numbers are pycocotools COCOeval.summarize()'s; per-class AP is the mean of
COCOeval's precision over IoU 0.50:0.95 and recall, area "all", at the largest maxDets
(as mmdet's CocoMetric classwise table and detectron2 compute it).
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from harness.errors import UserError
from harness.eval.coco import STAT_NAMES

EVALUATORS = ("pycocotools", "faster-coco-eval")
MAX_DETS = (1, 10, 100)  # pycocotools' own; AP, AP50... all at 100


@dataclass
class CocoScores:
    """stats: STAT_NAMES → value; per_class: class name → AP (None: no ground truth);
    evaluator: which library computed them; seconds: its evaluate + accumulate time."""

    stats: dict[str, float]
    per_class: dict[str, Optional[float]]
    evaluator: str
    seconds: float


def faster_coco_eval_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("faster_coco_eval") is not None


def resolve_evaluator(name: str) -> str:
    """auto → faster-coco-eval when installed, else pycocotools."""
    if name == "auto":
        return "faster-coco-eval" if faster_coco_eval_installed() else "pycocotools"
    if name not in EVALUATORS:
        raise UserError(f"unknown evaluator '{name}'; choose auto|{'|'.join(EVALUATORS)}")
    if name == "faster-coco-eval" and not faster_coco_eval_installed():
        raise UserError("--evaluator faster-coco-eval: the faster_coco_eval package is not "
                        "installed (pip install faster-coco-eval), or use pycocotools")
    return name


def _cocoeval(coco: Any, results: list[dict], evaluator: str) -> tuple[Any, Any, Any]:
    """(ground truth, detections, COCOeval class) in the chosen library's types."""
    if evaluator == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return coco, coco.loadRes(results), COCOeval
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    gt = FasterCOCO(coco.dataset)
    return gt, gt.loadRes(results), COCOeval_faster


def evaluate(coco: Any, results: Sequence[dict], image_ids: Sequence[int],
             class_names: Mapping[int, str], evaluator: str = "pycocotools",
             max_dets: Sequence[int] = MAX_DETS) -> CocoScores:
    """Evaluate COCO result entries on `image_ids` of `coco` (a pycocotools COCO).

    class_names: category id → the name per-class AP is reported under (categories of the
    file that are not in it are still evaluated, just not listed).
    """
    results = [dict(r) for r in results]  # loadRes adds keys to each entry: not the caller's
    started = time.perf_counter()
    per_class: dict[str, Optional[float]]
    if not results:  # loadRes cannot take an empty list; nothing found is AP 0
        wanted = set(image_ids)
        gt_cats = {a["category_id"] for a in coco.dataset["annotations"]
                   if a["image_id"] in wanted}
        per_class = {name: (0.0 if cat in gt_cats else None)
                     for cat, name in class_names.items()}
        return CocoScores(dict.fromkeys(STAT_NAMES, 0.0), per_class, evaluator, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt, cocoeval = _cocoeval(coco, results, evaluator)
        ev = cocoeval(gt, dt, "bbox")
        ev.params.maxDets = list(max_dets)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    seconds = time.perf_counter() - started
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    precision = np.asarray(ev.eval["precision"])  # (iou, recall, class, area, maxDets)
    cat_index = {int(c): k for k, c in enumerate(ev.params.catIds)}
    per_class = {}
    for cat, name in class_names.items():
        k = cat_index.get(int(cat))
        p = precision[:, :, k, 0, -1] if k is not None else np.empty(0)
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else None
    return CocoScores(stats, per_class, evaluator, seconds)
