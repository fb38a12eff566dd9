"""The mmyolo configs the harness is checked against: one small shipped config per family.

mmyolo's wheel carries its configs under `mmyolo/.mim/configs`; `shipped_config` finds them
there so tests and users can build any family without a source checkout.
"""
from __future__ import annotations

from pathlib import Path

from harness.errors import UserError
from harness.experiment import resolve_path

SHIPPED_CONFIGS = {
    "yolov5": "yolov5/yolov5_n-v61_syncbn_fast_8xb16-300e_coco.py",
    "yolov6": "yolov6/yolov6_n_syncbn_fast_8xb32-400e_coco.py",
    "yolov7": "yolov7/yolov7_tiny_syncbn_fast_8x16b-300e_coco.py",
    "yolov8": "yolov8/yolov8_n_syncbn_fast_8xb16-500e_coco.py",
    "yolox": "yolox/yolox_nano_fast_8xb8-300e_coco.py",
    "rtmdet": "rtmdet/rtmdet_tiny_syncbn_fast_8xb32-300e_coco.py",
    "ppyoloe": "ppyoloe/ppyoloe_plus_s_fast_8xb8-80e_coco.py",
}

# The bundled fixture detector, shipped inside the package (harness/fixture/): the same files
# an experiment names as harness:fixture/yolov5_n_synth_320.py / .pth.
FIXTURE_CONFIG = resolve_path("harness:fixture/yolov5_n_synth_320.py")
FIXTURE_CHECKPOINT = resolve_path("harness:fixture/yolov5_n_synth_320.pth")
# The two-stage fixture: mmdet Faster R-CNN, half-width ResNet-18 + FPN, 320 px
TWO_STAGE_FIXTURE_CONFIG = resolve_path("harness:fixture/faster_rcnn_r18_synth_320.py")
TWO_STAGE_FIXTURE_CHECKPOINT = resolve_path("harness:fixture/faster_rcnn_r18_synth_320.pth")


def mmyolo_config_root() -> Path:
    import importlib.util

    # find_spec, not import: reading configs must not need mmcv's compiled ops
    spec = importlib.util.find_spec("mmyolo")
    if spec is None or spec.origin is None:
        raise UserError("mmyolo is not installed; install harness[mm]")
    root = Path(spec.origin).resolve().parent / ".mim" / "configs"
    if not root.is_dir():
        raise UserError(f"mmyolo at {root.parent.parent} ships no configs (.mim/configs)")
    return root


def shipped_config(family: str) -> Path:
    """Path of the small shipped config of `family` (a key of SHIPPED_CONFIGS)."""
    if family not in SHIPPED_CONFIGS:
        raise UserError(f"unknown family '{family}'; known: {', '.join(SHIPPED_CONFIGS)}")
    return mmyolo_config_root() / SHIPPED_CONFIGS[family]
