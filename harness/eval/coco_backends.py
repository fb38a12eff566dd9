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
    """The loaded backend of `config`, or a row saying why it cannot run here."""
    from harness.eval.latency import cuda_sync
    from harness.export.metadata import file_sha256

    if config.backend == "torch":
        import torch

        from harness.backends.torch_backend import TorchBackend

        if config.device == "cuda" and not torch.cuda.is_available():
            return _unavailable(config, f"PyTorch {torch.__version__} here has no CUDA device")
        backend = TorchBackend(model, device=config.device, precision=config.precision,
                               outputs="raw")
        try:
            backend.load()
        except UserError as exc:
            return _unavailable(config, str(exc))
        fingerprint = {"config_sha256": file_sha256(model.cfg_path),
                       "checkpoint_sha256": files.checkpoint_sha256()}
        return RowBackend(config, backend, fingerprint=fingerprint,
                          sync=cuda_sync(config.device))

    if config.backend == "onnxruntime":
        import onnxruntime as ort

        from harness.backends.onnxruntime_backend import PROVIDERS, OnnxruntimeBackend

        provider = PROVIDERS[config.device]
        if provider not in ort.get_available_providers():
            return _unavailable(config, f"onnxruntime {ort.__version__} here has no {provider} "
                                "(install onnxruntime-gpu)")
        path = files.onnx(config.precision)
        # session.run returns host arrays, so it is synchronous on CUDA too
        backend = OnnxruntimeBackend(path, provider=config.device)
        backend.load()
        return RowBackend(config, backend, fingerprint={"onnx_sha256": backend.model_sha256})

    if config.backend == "tensorrt":
        from harness.backends.tensorrt_backend import TensorRTBackend
        from harness.backends.tensorrt_build import current_gpu, import_tensorrt

        try:
            import_tensorrt()
            current_gpu()
        except UserError as exc:
            return _unavailable(config, str(exc))
        path = files.engine(config.precision)
        backend = TensorRTBackend(path)
        try:
            backend.load()
        except UserError as exc:
            return _unavailable(config, str(exc))
        return RowBackend(config, backend, fingerprint={"engine_sha256": file_sha256(path)},
                          sync=cuda_sync("cuda"))
    raise UserError(f"unknown backend '{config.backend}'")
