"""Reading preprocessing and NMS settings out of configs: nothing configured twice."""
from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.models.mmyolo import FAMILIES, NmsSettings, read_config
from harness.models.pipeline import (
    FixedResize, KeepRatioResize, LetterResize, PadBottomRight, Rescale,
    preprocess_spec_from_config,
)
from harness.models.zoo import FIXTURE_CONFIG, SHIPPED_CONFIGS, shipped_config


def test_yolov5_pipeline_is_keep_ratio_then_letterbox():
    spec = preprocess_spec_from_config(read_config(shipped_config("yolov5")))
    assert spec.steps == (KeepRatioResize(scale=(640, 640)),
                          LetterResize(scale=(640, 640), pad_val=114.0, allow_scale_up=False))
    assert spec.bgr_to_rgb and spec.normalize and spec.std == (255.0, 255.0, 255.0)


def test_yolox_pipeline_rescales_and_pads_square_without_normalising():
    spec = preprocess_spec_from_config(read_config(shipped_config("yolox")))
    assert spec.steps == (Rescale(scale=(416, 416)),
                          PadBottomRight(pad_val=114.0, pad_to_square=True))
    assert not spec.normalize and not spec.bgr_to_rgb and spec.pad_size_divisor == 32


def test_ppyoloe_pipeline_stretches_bicubic():
    spec = preprocess_spec_from_config(read_config(shipped_config("ppyoloe")))
    assert spec.steps == (FixedResize(size=(640, 640), interpolation="bicubic"),)


def test_rtmdet_mean_std_are_read():
    spec = preprocess_spec_from_config(read_config(shipped_config("rtmdet")))
    assert spec.mean == (103.53, 116.28, 123.675) and not spec.bgr_to_rgb


def test_unknown_transform_is_refused_by_name():
    cfg = {"model": {"data_preprocessor": {}},
           "test_dataloader": {"dataset": {"pipeline": [
               {"type": "LoadImageFromFile"}, {"type": "Mosaic", "img_scale": (640, 640)}]}}}
    with pytest.raises(UserError, match="Mosaic"):
        preprocess_spec_from_config(cfg)


@pytest.mark.parametrize("family", list(SHIPPED_CONFIGS))
def test_every_family_config_is_recognised(family):
    cfg = read_config(shipped_config(family))
    head = cfg.model.bbox_head.type.split(".")[-1]
    assert FAMILIES[head] == family


def test_nms_settings_from_test_cfg():
    cfg = read_config(shipped_config("yolov8"))
    s = NmsSettings.from_test_cfg(cfg.model.test_cfg, num_classes=80)
    assert s == NmsSettings(score_thr=0.001, nms_pre=30000, iou_threshold=0.7,
                            max_per_img=300, multi_label=True, yolox_style=False)
    yolox = NmsSettings.from_test_cfg(read_config(shipped_config("yolox")).model.test_cfg, 80)
    assert yolox.yolox_style and yolox.nms_pre == 100000  # mmyolo's default when absent


def test_single_class_turns_multi_label_off():
    cfg = read_config(FIXTURE_CONFIG)
    assert NmsSettings.from_test_cfg(cfg.model.test_cfg, num_classes=1).multi_label is False
    assert NmsSettings.from_test_cfg(cfg.model.test_cfg, num_classes=5).multi_label is True
