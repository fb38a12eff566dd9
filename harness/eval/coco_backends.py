"""The backend behind each row of the COCO matrix, or the reason it cannot run here.

ONNX files and TensorRT engines come from the user (experiment file) or are made once into a
cache folder and reused: raw-variant ONNX at fp32 / fp16 / int8 (int8 calibrated on images of
the split), engines built from those with one batch profile. A runtime that is not installed
(TensorRT, onnxruntime's CUDA provider, PyTorch CUDA) gives a row "not available: <reason>".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from harness.errors import UserError
from harness.experiment import Configuration


@dataclass
class RowBackend:
    """backend: a Backend ready to run, or None with `reason` ("not available: ...");
    fingerprint: what the results depend on (files' sha256), for the run store's header;
    sync: device synchronisation around inference (None on the CPU)."""

    config: Configuration
    backend: Any = None
    reason: Optional[str] = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    sync: Optional[Callable[[], None]] = None

    @property
    def available(self) -> bool:
        return self.backend is not None


class ModelFiles:
    """Exported ONNX files and engines of one model: the user's when given, else made into
    `cache_dir` and reused while they were made from the same checkpoint.

    calib_images / calib_count: int8 calibration images (a folder; evenly spaced subset).
    batches: the batch sizes engines must accept.
    """

    def __init__(self, model: Any, cache_dir: Path, onnx: Optional[Mapping[str, Path]] = None,
                 engines: Optional[Mapping[str, Path]] = None,
                 calib_images: Optional[Path] = None,
                 calib_count: int = 32, batches: Sequence[int] = (1, 4),
                 log: Callable[[str], None] = print):
        self.model = model
        self.cache_dir = Path(cache_dir)
        self.given_onnx = dict(onnx or {})
        self.given_engines = dict(engines or {})
        self.calib_images = calib_images
        self.calib_count = calib_count
        self.max_batch = max(batches)
        self.log = log
        self._checkpoint_sha: Optional[str] = None

    def checkpoint_sha256(self) -> Optional[str]:
        from harness.export.metadata import file_sha256

        if self._checkpoint_sha is None and self.model.ckpt_path is not None:
            self._checkpoint_sha = file_sha256(self.model.ckpt_path)
        return self._checkpoint_sha

    def onnx(self, precision: str) -> Path:
        """The raw-variant ONNX at `precision`: given, cached, or exported now."""
        if precision in self.given_onnx:
            path = self.given_onnx[precision]
            if not path.is_file():
                raise UserError(f"ONNX file not found: {path} (model.onnx.{precision})")
            return path
        path = self.cache_dir / "onnx" / f"{Path(self.model.cfg_path).stem}_raw_{precision}.onnx"
        from harness.export.calibration import CalibrationSettings
        from harness.export.onnx_export import ExportSettings, export_cached

        calibration = None
        if precision == "int8":
            if self.calib_images is None:
                raise UserError("int8 export needs calibration images")
            calibration = CalibrationSettings(images=self.calib_images, count=self.calib_count,
                                              cache_dir=self.cache_dir / "calibration")
        return export_cached(self.model, path, ExportSettings(variant="raw", precision=precision),
                             calibration, self.log)

    def engine(self, precision: str) -> Path:
        """A TensorRT engine at `precision`: given, cached (its sidecar still matching), or
        built now from the raw ONNX (int8: from the calibrated Q/DQ ONNX)."""
        if precision in self.given_engines:
            path = self.given_engines[precision]
            if not path.is_file():
                raise UserError(f"engine not found: {path} (model.engines.{precision})")
            return path
        from harness.backends.tensorrt_backend import TensorRTBackend
        from harness.backends.tensorrt_build import build_engine

        onnx_path = self.onnx("int8" if precision == "int8" else "fp32")
        path = self.cache_dir / "engines" / \
            f"{onnx_path.stem}_{precision}_b1-{self.max_batch}.engine"
        if path.is_file():
            try:
                TensorRTBackend(path, onnx_path=onnx_path).load()
                return path
            except UserError as exc:
                self.log(f"rebuilding {path.name}: {exc}")
        self.log(f"building {path}")
        build_engine(onnx_path, path, precision=precision, min_batch=1,
                     opt_batch=self.max_batch, max_batch=self.max_batch,
                     timing_cache=self.cache_dir / "engines" / "timing.cache")
        return path


def _unavailable(config: Configuration, reason: str) -> RowBackend:
    return RowBackend(config, reason=f"not available: {reason}")


def open_backend(config: Configuration, model: Any, files: ModelFiles) -> RowBackend:
    """The loaded backend of `config`, or a row saying why it cannot run here (the runtime
    is not installed, or has no such device). A file that cannot be made or loaded is a
    UserError: the row fails with it and the others go on."""
    from harness.backends.registry import backend_class
    from harness.eval.latency import cuda_sync

    cls = backend_class(config.backend)
    reason = cls.unavailable(config.device)
    if reason is not None:
        return _unavailable(config, reason)
    backend, fingerprint = cls.for_configuration(config, model, files)
    return RowBackend(config, backend, fingerprint=fingerprint,
                      sync=None if cls.synchronous else cuda_sync(config.device))
