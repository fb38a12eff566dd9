"""One preprocessing for every backend: image file → the float32 NCHW batch mmyolo's test
path would build, plus per-image metadata to map boxes back to the original image.

Follows mmcv 2.0 / mmdet 3.0 / mmyolo 0.6 pixel for pixel (cv2 calls, size rounding, pad
placement); docs/nms-semantics.md "Preprocessing" describes the arithmetic.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from harness.errors import UserError
from harness.models.pipeline import (
    INTERPOLATIONS, FixedResize, KeepRatioResize, LetterResize, PadBottomRight,
    PreprocessSpec, Rescale,
)


@dataclass(frozen=True)
class ImageMeta:
    """Where an image's pixels went: undo with x = (x' - pad_left) / sx."""

    path: str
    ori_shape: tuple[int, int]  # (h, w) of the file
    img_shape: tuple[int, int]  # (h, w) after resize/pad, before batch padding
    scale_factor: tuple[float, float]  # (sx, sy)
    pad_param: Union[tuple[float, float, float, float], None] = None  # top, bottom, left, right


def pad_left_top(meta: Any) -> tuple[float, float]:
    """(left, top) letterbox padding of an image meta (0, 0 without padding): what mmyolo
    subtracts before dividing by the scale factor."""
    pad = meta.pad_param
    return (pad[2], pad[0]) if pad is not None else (0.0, 0.0)


@dataclass
class Batch:
    """Network input for several images and what is needed to map results back."""

    inputs: np.ndarray  # (B, 3, H, W) float32
    metas: list[ImageMeta] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        """Hash of the exact bytes every backend receives (recorded in results)."""
        return hashlib.sha256(np.ascontiguousarray(self.inputs).tobytes()).hexdigest()


# the image files the harness reads from a folder (what cv2.imdecode reads)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(folder: Path, count: int = 0) -> list[Path]:
    """The first `count` image files of `folder` by name (every one for 0); a missing or
    image-less folder is a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if count < 0:
        raise UserError(f"the image count must not be negative, got {count}")
    return images[:count] if count else images


def read_image(path: Union[str, Path]) -> np.ndarray:
    """BGR uint8 (H, W, 3), decoded as mmcv.imfrombytes(flag='color') does."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise UserError(f"image not found: {p}")
    data = np.fromfile(str(p), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"cannot decode image {p}: not a readable image file (corrupt or "
                        "unsupported format)")
    return img


def _resize(img: np.ndarray, size_wh: tuple[int, int], interpolation: str) -> np.ndarray:
    import cv2

    return cv2.resize(img, size_wh, interpolation=INTERPOLATIONS[interpolation])


def _pad(img: np.ndarray, top: int, bottom: int, left: int, right: int,
         value: float) -> np.ndarray:
    import cv2

    if top == bottom == left == right == 0:
        return img
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT,
                              value=(value,) * img.shape[2])


def _keep_ratio_resize(img, step: KeepRatioResize):
    h, w = img.shape[:2]
    long_edge, short_edge = max(step.scale), min(step.scale)
    ratio = min(long_edge / max(h, w), short_edge / min(h, w))
    if ratio != 1:
        # mmyolo truncates the new size and shrinks with area interpolation.
        img = _resize(img, (int(w * ratio), int(h * ratio)),
                      "area" if ratio < 1 else "bilinear")
    rh, rw = img.shape[:2]
    return img, (rw / w, rh / h), None


def _letter_resize(img, step: LetterResize, batch_shape=None):
    h, w = img.shape[:2]
    # mmyolo's LetterResize letterboxes to the image's batch shape (h, w) when the dataset
    # set one (BatchShapePolicy), else to its own scale (w, h)
    target_h, target_w = batch_shape if batch_shape is not None else (step.scale[1],
                                                                      step.scale[0])
    ratio = min(target_h / h, target_w / w)
    if not step.allow_scale_up:
        ratio = min(ratio, 1.0)
    no_pad = (int(round(h * ratio)), int(round(w * ratio)))
    pad_h, pad_w = target_h - no_pad[0], target_w - no_pad[1]
    if step.use_mini_pad:
        pad_w, pad_h = int(np.mod(pad_w, 32)), int(np.mod(pad_h, 32))
    elif step.stretch_only:
        pad_h, pad_w = 0, 0
        no_pad = (target_h, target_w)
    if (h, w) != no_pad:
        img = _resize(img, (no_pad[1], no_pad[0]), step.interpolation)
    scale = (no_pad[1] / w, no_pad[0] / h)
    top, left = int(round(pad_h // 2 - 0.1)), int(round(pad_w // 2 - 0.1))
    bottom, right = pad_h - top, pad_w - left
    img = _pad(img, top, bottom, left, right, step.pad_val)
    if step.half_pad_param:
        pad = (pad_h / 2, pad_h / 2, pad_w / 2, pad_w / 2)
    else:
        pad = (float(top), float(bottom), float(left), float(right))
    return img, scale, pad


def _rescale(img, step: Rescale):
    h, w = img.shape[:2]
    factor = min(max(step.scale) / max(h, w), min(step.scale) / min(h, w))
    # mmcv._scale_size rounds half up
    new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    img = _resize(img, (new_w, new_h), step.interpolation)
    return img, (new_w / w, new_h / h), None


def _fixed_resize(img, step: FixedResize):
    h, w = img.shape[:2]
    img = _resize(img, step.size, step.interpolation)
    return img, (step.size[0] / w, step.size[1] / h), None


def _pad_bottom_right(img, step: PadBottomRight):
    h, w = img.shape[:2]
    size = None
    if step.pad_to_square:
        size = (max(h, w), max(h, w))
    if step.size_divisor is not None:
        base = size or (h, w)
        size = (int(np.ceil(base[0] / step.size_divisor)) * step.size_divisor,
                int(np.ceil(base[1] / step.size_divisor)) * step.size_divisor)
    elif step.size is not None:
        size = (step.size[1], step.size[0])
    if size is None:
        return img, (1.0, 1.0), None
    img = _pad(img, 0, max(size[0] - h, 0), 0, max(size[1] - w, 0), step.pad_val)
    return img, (1.0, 1.0), None


_APPLY = {KeepRatioResize: _keep_ratio_resize, LetterResize: _letter_resize,
          Rescale: _rescale, FixedResize: _fixed_resize, PadBottomRight: _pad_bottom_right}


def transform_image(img: np.ndarray, spec: PreprocessSpec, path: str = "",
                    batch_shape: Union[tuple[int, int], None] = None
                    ) -> tuple[np.ndarray, ImageMeta]:
    """Apply the pipeline's pixel steps to one BGR uint8 image; batch_shape (h, w): the
    rectangle mmyolo's BatchShapePolicy gave the image's batch (LetterResize pads to it).

    Returns the float32 (3, H, W) normalised input and its ImageMeta.
    """
    ori_shape = (int(img.shape[0]), int(img.shape[1]))
    scale = (1.0, 1.0)
    pad: Union[tuple[float, ...], None] = None
    for step in spec.steps:
        if batch_shape is not None and isinstance(step, LetterResize):
            img, (sx, sy), step_pad = _letter_resize(img, step, batch_shape)
        else:
            img, (sx, sy), step_pad = _APPLY[type(step)](img, step)
        # Successive resizes compose their factors (LetterResize's scale_factor_origin);
        # letterbox pads accumulate scaled by the later ratio, as mmyolo's pad_param_origin.
        if step_pad is not None:
            if pad is not None:
                pad = tuple(p * r + q for p, r, q in zip(pad, (sy, sy, sx, sx), step_pad))
            else:
                pad = step_pad
        scale = (scale[0] * sx, scale[1] * sy)
    img_shape = (int(img.shape[0]), int(img.shape[1]))
    x = _normalized_chw(img, spec)
    meta = ImageMeta(path=path, ori_shape=ori_shape, img_shape=img_shape,
                     scale_factor=(float(scale[0]), float(scale[1])),
                     pad_param=tuple(float(p) for p in pad) if pad is not None else None)
    return x, meta


def _normalized_chw(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The (C, H, W) float32 network input of a (H, W, C) uint8 image: channels reversed
    (bgr_to_rgb), then (x - mean) / std in float32, as mmdet's data preprocessor does. Made
    from OpenCV's contiguous planes and normalised in place: the same values as transposing,
    converting and normalising into new arrays (tests/models/test_preprocess_arrays.py),
    2.5x faster (0.31 against 0.78 ms for a 320x320 input on this project's CPU,
    experiments/bench_preprocess.py) — a reader's image 1.18x faster in all."""
    import cv2

    planes = cv2.split(img)
    if spec.bgr_to_rgb:
        planes = planes[::-1]
    x = np.empty((len(planes), img.shape[0], img.shape[1]), dtype=np.float32)
    for c, plane in enumerate(planes):
        x[c] = plane
    if spec.normalize:
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
        np.subtract(x, mean, out=x)
        np.divide(x, std, out=x)
    return x


def stacked_shape(inputs: Sequence[np.ndarray], spec: PreprocessSpec) -> tuple[int, ...]:
    """The (B, C, H, W) shape stack_inputs gives `inputs`: padded bottom/right to the largest
    image, rounded up to the size divisor, or to the file's fixed input (a UserError where an
    image does not fit it)."""
    div = max(spec.pad_size_divisor, 1)
    max_h = math.ceil(max(x.shape[1] for x in inputs) / div) * div
    max_w = math.ceil(max(x.shape[2] for x in inputs) / div) * div
    if spec.pad_to is not None:
        if max_h > spec.pad_to[0] or max_w > spec.pad_to[1]:
            raise UserError(f"an image of {max_w}x{max_h} after preprocessing does not fit the "
                            f"file's fixed input {spec.pad_to[1]}x{spec.pad_to[0]}")
        max_h, max_w = spec.pad_to
    return (len(inputs), int(inputs[0].shape[0]), int(max_h), int(max_w))


def stack_inputs(inputs: Sequence[np.ndarray], spec: PreprocessSpec,
                 out: Union[np.ndarray, None] = None) -> np.ndarray:
    """Pad bottom/right to the largest image, rounded up to the size divisor, and stack
    (mmengine's stack_batch). out: a float32 array of stacked_shape(inputs, spec) to stack
    into (a reader's shared-memory slot) instead of a new one."""
    shape = stacked_shape(inputs, spec)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"stack_inputs: out is {out.dtype} {out.shape}, not float32 {shape}")
    for i, x in enumerate(inputs):  # each element written once: the image, or padding
        h, w = x.shape[1], x.shape[2]
        out[i, :, :h, :w] = x
        out[i, :, h:, :] = spec.pad_value
        out[i, :, :h, w:] = spec.pad_value
    return out


def preprocess_files(paths: Sequence[Union[str, Path]], spec: PreprocessSpec) -> Batch:
    """Read and preprocess image files into one batch."""
    if not paths:
        raise UserError("no images to preprocess")
    arrays, metas = [], []
    for p in paths:
        x, meta = transform_image(read_image(p), spec, str(p))
        arrays.append(x)
        metas.append(meta)
    return Batch(inputs=stack_inputs(arrays, spec), metas=metas)
