"""Latency of one backend configuration: warm-up runs, then timed runs with preprocessing,
inference and post-processing (decode + NMS) timed apart, device-synchronised on a GPU; and
the machine the numbers were taken on (CPU, GPU, threads, library versions).
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness.errors import UserError

STAGES = ("preprocess", "infer", "post", "total")
STATISTICS = ("mean", "median", "p90", "p99")
UNIT = "ms per batch"


@dataclass(frozen=True)
class LatencySettings:
    """warmup: untimed runs first (caches, allocators, cuDNN autotuning, lazy init);
    runs: timed runs, each one batch through all three stages."""

    warmup: int
    runs: int

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.runs < 1:
            raise UserError(f"latency needs --warmup >= 0 and --runs >= 1, got warm-up "
                            f"{self.warmup}, runs {self.runs}")


GPU_DEFAULTS = LatencySettings(warmup=50, runs=1000)
CPU_DEFAULTS = LatencySettings(warmup=5, runs=50)


def default_settings(device: str, warmup: Optional[int] = None,
                     runs: Optional[int] = None) -> LatencySettings:
    """The device's defaults (GPU 50 + 1000, CPU 5 + 50), with what the user set on top."""
    base = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    return LatencySettings(warmup=base.warmup if warmup is None else warmup,
                           runs=base.runs if runs is None else runs)


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """mean / median / p90 / p99 of `seconds`, in milliseconds (numpy's linear percentiles)."""
    if len(seconds) == 0:
        return dict.fromkeys(STATISTICS, float("nan"))
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99))}


@dataclass
class LatencyResult:
    """stages: stage → statistics in ms per batch; images_per_s: batch / mean total time."""

    batch: int
    warmup: int
    runs: int
    stages: dict[str, dict[str, float]]
    images_per_s: float
    synchronized: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "LatencyResult":
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__})


def cuda_sync(device: str) -> Optional[Callable[[], None]]:
    """torch.cuda.synchronize for a CUDA device, None for the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    dev = torch.device(device)
    return lambda: torch.cuda.synchronize(dev)


def measure_latency(batches: Sequence[Any], preprocess: Callable[[Any], Any],
                    infer: Callable[[Any], Any], post: Callable[[Any, Any], Any],
                    settings: LatencySettings, batch_size: int,
                    sync: Optional[Callable[[], None]] = None) -> LatencyResult:
    """Time `settings.runs` runs of preprocess(item) → infer(prepared) → post(prepared, out)
    after `settings.warmup` untimed ones, cycling over `batches` (e.g. lists of image paths).

    The three stages run one after the other in the calling thread, so each time is that
    stage alone. `sync` (e.g. torch.cuda.synchronize) runs before a run and after inference,
    so asynchronous GPU work is inside the inference time, not the next stage's.
    """
    if not batches:
        raise UserError("no images to time")
    clock = time.perf_counter
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    for i in range(settings.warmup + settings.runs):
        item = batches[i % len(batches)]
        if sync:
            sync()
        t0 = clock()
        prepared = preprocess(item)
        t1 = clock()
        out = infer(prepared)
        if sync:
            sync()
        t2 = clock()
        post(prepared, out)
        t3 = clock()
        if i >= settings.warmup:
            times["preprocess"].append(t1 - t0)
            times["infer"].append(t2 - t1)
            times["post"].append(t3 - t2)
            times["total"].append(t3 - t0)
    stages = {s: summarize_ms(v) for s, v in times.items()}
    mean_s = stages["total"]["mean"] / 1000.0
    return LatencyResult(batch=batch_size, warmup=settings.warmup, runs=settings.runs,
                         stages=stages, images_per_s=batch_size / mean_s if mean_s else
                         float("nan"), synchronized=sync is not None)


# -- the machine ------------------------------------------------------------------------------

# distribution names whose versions a latency or accuracy number depends on
VERSIONED = ("numpy", "opencv-python", "torch", "onnx", "onnxruntime", "onnxruntime-gpu",
             "tensorrt", "mmcv", "mmengine", "mmdet", "mmyolo", "pycocotools",
             "faster-coco-eval")


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def library_versions() -> dict[str, Optional[str]]:
    """Installed versions (None: not installed), read from package metadata so nothing heavy
    is imported."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """cpu, gpu (None without CUDA), threads (PyTorch intra-op), cpu_count, usable cores,
    OMP_NUM_THREADS as set, and library versions."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"cpu": cpu_model(), "gpu": gpu, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "usable_cores": usable,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "versions": library_versions()}
