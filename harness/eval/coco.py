"""COCO box mAP through pycocotools, which decides; nothing here recomputes AP itself."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from harness.errors import UserError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
              "ARs", "ARm", "ARl")


def load_coco(ann_file: Union[str, Path]) -> Any:
    """pycocotools COCO of `ann_file`, with one-line errors for missing or malformed files."""
    from pycocotools.coco import COCO

    p = Path(ann_file)
    if not p.is_file():
        raise UserError(f"annotation file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"annotation file {p} is not valid JSON ({exc})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise UserError(f"annotation file {p} is not COCO format: no {', '.join(missing)}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(image_id: int, boxes: np.ndarray, scores: np.ndarray,
                       labels: np.ndarray, category_ids: Sequence[int]) -> list[dict]:
    """COCO result entries; boxes (K, 4) xyxy original pixels, labels index category_ids."""
    out = []
    for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        x1, y1, x2, y2 = box
        out.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out
