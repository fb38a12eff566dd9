"""int8 calibration data: the harness's own preprocessing of dataset images, streamed one image
at a time to onnxruntime's calibrator, and the key under which the computed ranges are cached
(model graph + image list + method + preprocessing), so a second export does not recompute.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from harness.data.preprocess import IMAGE_SUFFIXES
from harness.errors import UserError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationSettings:
    """Where int8 calibration images come from and how ranges are computed.

    images: a folder searched recursively for image files; count: how many, spread evenly
    over the sorted list; method: minmax | entropy | percentile; cache_dir: where computed
    ranges are kept (None: not cached).
    """

    images: Path
    count: int = 32
    method: str = "minmax"
    cache_dir: Union[Path, None] = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UserError(f"unknown calibration method '{self.method}'; choose one of "
                            f"{', '.join(CALIBRATION_METHODS)}")
        if self.count < 1:
            raise UserError(f"--calib-count must be at least 1, got {self.count}")
        if not Path(self.images).is_dir():
            raise UserError(f"calibration folder not found: {self.images}")


def calibration_images(folder: Path, count: int) -> list[Path]:
    """`count` image files of `folder` (recursive), evenly spaced over the sorted list."""
    if not folder.is_dir():
        raise UserError(f"calibration folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file())
    if not paths:
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if count >= len(paths):
        return paths
    return [paths[i * len(paths) // count] for i in range(count)]


def fit_to_input(x: np.ndarray, size_hw: tuple[int, int], pad_value: float,
                 path: str = "") -> np.ndarray:
    """Pad one preprocessed image (3, h, w) bottom/right to the network input (3, H, W), as
    stack_inputs pads a batch; an image larger than the input is a UserError."""
    h, w = x.shape[1:]
    if h > size_hw[0] or w > size_hw[1]:
        raise UserError(f"image {path or ''} preprocesses to {w}x{h}, larger than the model "
                        f"input {size_hw[1]}x{size_hw[0]}")
    if (h, w) == tuple(size_hw):
        return x
    out = np.full((3, size_hw[0], size_hw[1]), pad_value, np.float32)
    out[:, :h, :w] = x
    return out


class CalibrationReader:
    """onnxruntime CalibrationDataReader protocol (`get_next`) over image files: reads and
    preprocesses one image per call, so calibration never holds the whole set in memory."""

    def __init__(self, paths: Sequence[Path], spec: Any, input_name: str,
                 size_hw: tuple[int, int]):
        self.paths = list(paths)
        self.spec = spec
        self.input_name = input_name
        self.size_hw = size_hw
        self.consumed = 0

    def get_next(self) -> Union[dict[str, np.ndarray], None]:
        from harness.data.preprocess import read_image, transform_image

        if self.consumed >= len(self.paths):
            return None
        path = self.paths[self.consumed]
        self.consumed += 1
        x, _ = transform_image(read_image(path), self.spec, str(path))
        x = fit_to_input(x, self.size_hw, self.spec.pad_value, str(path))
        return {self.input_name: x[None]}

    def rewind(self) -> None:
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.paths)


def calibration_key(model_bytes: bytes, paths: Sequence[Path], method: str,
                    preprocess: dict[str, Any], size_hw: tuple[int, int]) -> str:
    """sha256 naming one calibration: the graph calibrated, each image's content, the method,
    the preprocessing and the onnxruntime version that computed the ranges."""
    import onnxruntime

    images = [[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in paths]
    doc = {"model": hashlib.sha256(model_bytes).hexdigest(), "images": images,
           "method": method, "preprocess": preprocess, "input_hw": list(size_hw),
           "onnxruntime": onnxruntime.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
