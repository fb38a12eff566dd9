"""The preprocessing an mmyolo config asks for, read once from its test pipeline and
data preprocessor into plain dataclasses, so no backend configures it a second time.

Only the transforms that decide pixels are kept (resize, letterbox, pad); loading,
annotation and packing steps are recognised and skipped. Anything else is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from harness.errors import UserError

# mmcv.imresize interpolation names; the values are cv2 flags (cv2.INTER_*), kept as ints
# so this module does not import cv2.
INTERPOLATIONS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3, "lanczos": 4}


@dataclass(frozen=True)
class KeepRatioResize:
    """mmyolo YOLOv5KeepRatioResize: long side to max(scale), truncating the new size."""

    scale: tuple[int, int]  # (w, h)


@dataclass(frozen=True)
class LetterResize:
    """mmyolo LetterResize: resize within `scale` and pad to it, centred."""

    scale: tuple[int, int]  # (w, h)
    pad_val: float = 0.0
    allow_scale_up: bool = True
    use_mini_pad: bool = False
    stretch_only: bool = False
    half_pad_param: bool = False
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class Rescale:
    """mmdet Resize with keep_ratio=True (mmcv.imrescale: size rounded with +0.5)."""

    scale: tuple[int, int]  # (w, h)
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class FixedResize:
    """mmdet Resize(keep_ratio=False) / FixShapeResize: stretch to exactly (w, h)."""

    size: tuple[int, int]  # (w, h)
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class PadBottomRight:
    """mmdet Pad: pad bottom/right to a fixed size, a square or a size divisor."""

    pad_val: float = 0.0
    size: Union[tuple[int, int], None] = None  # (w, h)
    pad_to_square: bool = False
    size_divisor: Union[int, None] = None


Step = Union[KeepRatioResize, LetterResize, Rescale, FixedResize, PadBottomRight]


@dataclass(frozen=True)
class PreprocessSpec:
    """Image (BGR uint8) → network input (float32 CHW), as mmyolo's test path does it."""

    steps: tuple[Step, ...]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    normalize: bool = False
    bgr_to_rgb: bool = False
    pad_size_divisor: int = 1
    pad_value: float = 0.0
    skipped: tuple[str, ...] = field(default=())
    # the config's batch_shapes_cfg (mmyolo's rectangular per-batch shapes), or None
    batch_shapes: Optional["BatchShapePolicy"] = None
    # (h, w) every batch is padded to (bottom / right, pad_value), for a file with a fixed
    # input size fed by a keep-ratio model (two-stage); None: the batch's largest image
    pad_to: Optional[tuple[int, int]] = None

    def describe(self) -> dict[str, Any]:
        """Plain-data summary for reports and results.json."""
        return {
            "steps": [{"type": type(s).__name__, **s.__dict__} for s in self.steps],
            "mean": list(self.mean), "std": list(self.std), "normalize": self.normalize,
            "bgr_to_rgb": self.bgr_to_rgb, "pad_size_divisor": self.pad_size_divisor,
            "pad_value": self.pad_value,
            "batch_shapes": None if self.batch_shapes is None else self.batch_shapes.__dict__,
            **({"pad_to": list(self.pad_to)} if self.pad_to is not None else {}),
        }

    def largest_input(self) -> Optional[tuple[int, int]]:
        """(h, w) that holds every image this preprocessing can give, for a file with a fixed
        input: mmdet's keep-ratio Resize keeps the long side within max(scale) in either
        orientation, so a square of that side rounded up to the pad divisor. None when the
        steps are not a lone keep-ratio Resize (their size is fixed or unbounded)."""
        import math

        if len(self.steps) != 1 or not isinstance(self.steps[0], Rescale):
            return None
        div = max(self.pad_size_divisor, 1)
        side = math.ceil(max(self.steps[0].scale) / div) * div
        return (side, side)


@dataclass(frozen=True)
class BatchShapePolicy:
    """mmyolo's BatchShapePolicy (mmyolo/datasets/utils.py, v0.6.0), which YOLOv5/v6/v7
    val configs set as `batch_shapes_cfg`: images sorted by aspect ratio, grouped into
    batches of `batch_size`, each batch letterboxed to its own rectangle
    ceil(ratio * img_size / size_divisor + extra_pad_ratio) * size_divisor."""

    batch_size: int = 32
    img_size: int = 640
    size_divisor: int = 32
    extra_pad_ratio: float = 0.5

    def plan(self, sizes: Sequence[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """For images of `sizes` (w, h) in dataset order: the order mmyolo evaluates them in
        (indices into `sizes`) and each one's batch shape (h, w), in that order. Follows the
        policy's arithmetic step for step (numpy's default argsort included)."""
        import numpy as np

        shapes_wh = np.asarray(sizes, dtype=np.float64)
        n = len(shapes_wh)
        batch_index = np.floor(np.arange(n) / self.batch_size).astype(np.int64)
        batches = int(batch_index[-1]) + 1
        aspect = shapes_wh[:, 1] / shapes_wh[:, 0]
        order = aspect.argsort()
        aspect = aspect[order]
        ratios = [[1, 1]] * batches
        for i in range(batches):
            lo, hi = aspect[batch_index == i].min(), aspect[batch_index == i].max()
            if hi < 1:
                ratios[i] = [hi, 1]
            elif lo > 1:
                ratios[i] = [1, 1 / lo]
        shapes = np.ceil(np.array(ratios) * self.img_size / self.size_divisor +
                         self.extra_pad_ratio).astype(np.int64) * self.size_divisor
        return ([int(i) for i in order],
                [(int(shapes[b][0]), int(shapes[b][1])) for b in batch_index])


def batch_shape_policy(cfg: Any) -> Optional[BatchShapePolicy]:
    """The config's test (else val) dataset `batch_shapes_cfg`, or None."""
    for loader in ("test_dataloader", "val_dataloader"):
        try:
            policy = dict(cfg[loader]["dataset"].get("batch_shapes_cfg") or {})
        except (KeyError, TypeError, AttributeError):
            continue
        if policy:
            kind = str(policy.pop("type", "BatchShapePolicy")).split(".")[-1]
            if kind != "BatchShapePolicy":
                raise UserError(f"batch_shapes_cfg type {kind} is not supported "
                                "(only mmyolo's BatchShapePolicy)")
            return BatchShapePolicy(**policy)
    return None


# Transforms with no effect on pixels at test time (with or without an "mmdet." scope).
_PASSIVE = {"LoadImageFromFile", "LoadImageFromNDArray", "LoadAnnotations", "PackDetInputs"}


def _scale_wh(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _pad_val(value: Any, default: float = 0.0) -> float:
    if value is None:
        return default
    if isinstance(value, dict):
        value = value.get("img", default)
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise UserError(f"per-channel pad values {value} are not supported")
        value = value[0]
    return float(value)


def _interp(t: dict, default: str = "bilinear") -> str:
    name = t.get("interpolation", default)
    if name not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation '{name}' in test pipeline step {t['type']}")
    return name


def _parse_step(t: dict) -> Union[Step, None]:
    kind = t["type"].split(".")[-1]
    if kind in _PASSIVE:
        return None
    if kind == "YOLOv5KeepRatioResize":
        return KeepRatioResize(scale=_scale_wh(t["scale"]))
    if kind == "LetterResize":
        return LetterResize(
            scale=_scale_wh(t["scale"]), pad_val=_pad_val(t.get("pad_val"), 0.0),
            allow_scale_up=bool(t.get("allow_scale_up", True)),
            use_mini_pad=bool(t.get("use_mini_pad", False)),
            stretch_only=bool(t.get("stretch_only", False)),
            half_pad_param=bool(t.get("half_pad_param", False)), interpolation=_interp(t))
    if kind == "Resize":
        if t.get("scale") is None:
            raise UserError("test pipeline Resize without a fixed 'scale' is not supported")
        if t.get("keep_ratio", False):
            return Rescale(scale=_scale_wh(t["scale"]), interpolation=_interp(t))
        return FixedResize(size=_scale_wh(t["scale"]), interpolation=_interp(t))
    if kind == "FixShapeResize":
        if t.get("keep_ratio", False):
            raise UserError("FixShapeResize with keep_ratio=True is not supported")
        return FixedResize(size=(int(t["width"]), int(t["height"])), interpolation=_interp(t))
    if kind == "Pad":
        size = t.get("size")
        return PadBottomRight(pad_val=_pad_val(t.get("pad_val"), 0.0),
                              size=_scale_wh(size) if size is not None else None,
                              pad_to_square=bool(t.get("pad_to_square", False)),
                              size_divisor=t.get("size_divisor"))
    raise UserError(
        f"test pipeline step '{t['type']}' is not supported by harness; supported: "
        "YOLOv5KeepRatioResize, LetterResize, Resize, FixShapeResize, Pad")


def preprocess_spec_from_config(cfg: Any) -> PreprocessSpec:
    """Read `test_dataloader.dataset.pipeline` and `model.data_preprocessor` of an mmengine
    Config (or plain dict) into a PreprocessSpec."""
    try:
        pipeline = cfg["test_dataloader"]["dataset"]["pipeline"]
    except (KeyError, TypeError):
        try:
            pipeline = cfg["test_pipeline"]
        except (KeyError, TypeError):
            raise UserError("config has no test_dataloader.dataset.pipeline or test_pipeline; "
                            "is it an mmyolo detector config?") from None
    steps, skipped = [], []
    for t in pipeline:
        step = _parse_step(dict(t))
        if step is None:
            skipped.append(t["type"])
        else:
            steps.append(step)
    dp = dict(cfg["model"].get("data_preprocessor") or {})
    mean, std = dp.get("mean"), dp.get("std")
    normalize = mean is not None and std is not None
    return PreprocessSpec(
        steps=tuple(steps),
        mean=tuple(float(m) for m in mean) if normalize else (0.0, 0.0, 0.0),
        std=tuple(float(s) for s in std) if normalize else (1.0, 1.0, 1.0),
        normalize=normalize,
        bgr_to_rgb=bool(dp.get("bgr_to_rgb", False) or dp.get("rgb_to_bgr", False)),
        pad_size_divisor=int(dp.get("pad_size_divisor", 1)),
        pad_value=float(dp.get("pad_value", 0)),
        skipped=tuple(skipped),
        batch_shapes=batch_shape_policy(cfg),
    )
