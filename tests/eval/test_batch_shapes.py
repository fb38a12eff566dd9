"""Batch shapes: a config with `batch_shapes_cfg` (YOLOv5/v6/v7 val configs) is evaluated by
mmyolo's tools/test.py on per-batch rectangles, not on one square: `harness coco` can do
the same for the PyTorch rows (preprocess "batch_shapes"), and its AP then equals mmyolo's
own evaluation (Runner.test) of the same config and images; a fixed-shape row of the same
model stands beside it."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from harness.models.pipeline import BatchShapePolicy
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

pytestmark = pytest.mark.slow

BATCH = 2


def test_policy_plan_follows_mmyolo():
    """The plan equals mmyolo's BatchShapePolicy on the same data list."""
    from mmyolo.datasets.utils import BatchShapePolicy as Mmyolo

    sizes = [(640, 480), (333, 640), (500, 500), (120, 90), (1000, 300), (300, 1000),
             (640, 427)]
    order, shapes = BatchShapePolicy(batch_size=2, img_size=320).plan(sizes)
    theirs = Mmyolo(batch_size=2, img_size=320)(
        [{"width": w, "height": h, "i": i} for i, (w, h) in enumerate(sizes)])
    assert order == [d["i"] for d in theirs]
    assert shapes == [tuple(int(v) for v in d["batch_shape"]) for d in theirs]


def _config_with_batch_shapes(folder: Path) -> Path:
    cfg = folder / "fixture_batch_shapes.py"
    cfg.write_text(
        f"_base_ = {str(FIXTURE_CONFIG)!r}\n"
        f"val_dataloader = dict(batch_size={BATCH}, dataset=dict(batch_shapes_cfg=dict("
        f"type='BatchShapePolicy', batch_size={BATCH}, img_size=320, size_divisor=32, "
        "extra_pad_ratio=0.5)))\n"
        "test_dataloader = val_dataloader\n")
    return cfg


def _mmyolo_ap(cfg_path: Path, val_dir: Path, work: Path) -> float:
    """Runner.test() of the config on `val_dir`, its detections dumped by CocoMetric and
    scored by pycocotools (CocoMetric's own numbers are rounded to 3 decimals)."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from mmyolo.utils import register_all_modules
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(cfg_path))
    root = str(val_dir.parent.resolve()) + "/"
    ann = root + f"annotations/instances_{val_dir.name}.json"
    cfg.test_dataloader.dataset.data_root = root
    cfg.test_dataloader.dataset.ann_file = ann
    cfg.test_dataloader.dataset.data_prefix = dict(img=f"{val_dir.name}/")
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    cfg.test_evaluator = dict(type="mmdet.CocoMetric", ann_file=ann, metric="bbox",
                              format_only=True, outfile_prefix=str(work / "mmyolo"))
    cfg.custom_hooks = []
    cfg.load_from = str(FIXTURE_CHECKPOINT)
    cfg.work_dir = str(work)
    cfg.log_level = "WARNING"
    Runner.from_cfg(cfg).test()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        ev = COCOeval(gt, gt.loadRes(str(work / "mmyolo.bbox.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_batch_shape_rows_equal_mmyolos_own_evaluation(synth_val, tmp_path, capsys):
    from harness.cli import main

    cfg = _config_with_batch_shapes(tmp_path)
    out = tmp_path / "report"
    code = main(["coco", str(synth_val), "--cfg", str(cfg), "--ckpt", str(FIXTURE_CHECKPOINT),
                 "--backends", "torch", "onnxruntime", "--precisions", "fp32", "--batches",
                 str(BATCH), "--preprocess", "fixed", "batch_shapes", "--runs", "2",
                 "--warmup", "0", "--evaluator", "pycocotools", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())["coco"]["rows"]
    # batch shapes only where the backend takes any input size: no onnxruntime row for it
    assert [(r["backend"], r["preprocess"]) for r in rows] == [
        ("torch", "fixed"), ("torch", "batch_shapes"), ("onnxruntime", "fixed")]
    shaped = rows[1]
    assert shaped["status"] == "ok"
    theirs = _mmyolo_ap(cfg, synth_val, tmp_path / "mmengine")
    assert shaped["AP"] == pytest.approx(theirs, abs=1e-4)
    md = (out / "coco.md").read_text()
    assert "| torch | cpu | fp32 | 2 | 30000 | batch shapes |" in md
    assert "| torch | cpu | fp32 | 2 | 30000 | fixed |" in md
