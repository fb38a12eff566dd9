"""The harness's PyTorch fp32 AP on a split equals the framework's own evaluation of the same
checkpoint on the same split: mmengine's test loop (Runner.test) with mmdet's CocoMetric — for
the one-stage fixture (mmyolo) and the two-stage one (mmdet Faster R-CNN).

Both sides use pycocotools' maxDets (1, 10, 100): the fixture config's own proposal_nums
(100, 1, 10) would put AP at 100 detections but AP50, AP75 and APs/m/l at 10 (COCOeval
summarises those at maxDets[2]). CocoMetric rounds to 3 decimals, hence the 1e-3.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.eval.runner import run_coco
from harness.settings import CocoSettings
from harness.experiment import Configuration
from harness.models.zoo import (
    FIXTURE_CHECKPOINT, FIXTURE_CONFIG, TWO_STAGE_FIXTURE_CHECKPOINT, TWO_STAGE_FIXTURE_CONFIG,
)

FIXTURES = {"yolov5": (FIXTURE_CONFIG, FIXTURE_CHECKPOINT),
            "faster_rcnn": (TWO_STAGE_FIXTURE_CONFIG, TWO_STAGE_FIXTURE_CHECKPOINT)}

PAIRS = {"AP": "bbox_mAP", "AP50": "bbox_mAP_50", "AP75": "bbox_mAP_75",
         "APs": "bbox_mAP_s", "APm": "bbox_mAP_m", "APl": "bbox_mAP_l"}


def mmdet_coco_metric(val_dir: Path, work_dir: Path, config: Path = FIXTURE_CONFIG,
                      checkpoint: Path = FIXTURE_CHECKPOINT) -> dict[str, float]:
    """Runner.test() of a fixture config on `val_dir` (COCO layout) → CocoMetric's numbers."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from mmyolo.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(config))
    root = str(val_dir.parent.resolve()) + "/"
    ann = f"annotations/instances_{val_dir.name}.json"
    cfg.test_dataloader.dataset.data_root = root
    cfg.test_dataloader.dataset.ann_file = ann
    cfg.test_dataloader.dataset.data_prefix = dict(img=f"{val_dir.name}/")
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    cfg.test_evaluator = dict(type="mmdet.CocoMetric", ann_file=root + ann, metric="bbox",
                              proposal_nums=(1, 10, 100))
    cfg.custom_hooks = []  # the checkpoint already holds the EMA weights
    cfg.load_from = str(checkpoint)
    cfg.work_dir = str(work_dir)
    cfg.log_level = "WARNING"
    metrics = Runner.from_cfg(cfg).test()
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_pytorch_fp32_ap_equals_mmdet_coco_metric(synth_val, tmp_path, fixture):
    config, checkpoint = FIXTURES[fixture]
    reference = mmdet_coco_metric(synth_val, tmp_path / "mmengine", config, checkpoint)
    settings = CocoSettings(
        images_dir=synth_val, annotations=None, config=config,
        checkpoint=checkpoint, cache_dir=tmp_path / "cache",
        configurations=(Configuration("torch", "cpu", "fp32", 1),), warmup=0, runs=1,
        progress=False, evaluator="pycocotools")
    doc, _ = run_coco(settings, log=lambda m: None)
    row = doc.to_json()["rows"][0]
    assert row["status"] == "ok" and row["images"] == 12
    assert 0.2 < row["AP"] < 1.0  # the fixture detects the shapes
    for ours, theirs in PAIRS.items():
        assert row[ours] == pytest.approx(reference[theirs], abs=1e-3), (ours, row, reference)
