"""Latency of one backend configuration: warm-up runs, then timed runs with preprocessing,
inference and post-processing (decode + NMS) timed apart, device-synchronised on a GPU; whether
the timings were steady enough to be read as the backend's (`stability`); and the machine the
numbers were taken on (CPU, GPU, threads, library versions).
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness.errors import UserError

STAGES = ("preprocess", "infer", "post", "total")
# std: population standard deviation (ddof 0, so one run gives 0, not NaN); cv: std / mean
STATISTICS = ("mean", "median", "p90", "p99", "std", "cv")
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
    """mean / median / p90 / p99 / std of `seconds` in milliseconds (numpy's linear
    percentiles, population std), and cv = std / mean (no unit; NaN when the mean is 0)."""
    if len(seconds) == 0:
        return dict.fromkeys(STATISTICS, float("nan"))
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    mean, std = float(ms.mean()), float(ms.std())
    return {"mean": mean, "median": float(np.median(ms)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "std": std, "cv": std / mean if mean else float("nan")}


# -- stability --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StabilityLimits:
    """When timings are too unsteady to be read as the backend's own latency, judged on the
    total time per batch (the number the tables and images/s are made of).

    max_p99_over_median = 2.0: on a quiet machine a fixed-shape batch takes nearly the same
    time every run (typically: synchronised GPU runs, p99 within 10-30 % of the median; CPU
    runs with their cores to themselves, p99 / median 1.1-1.5). A p99 twice the median means
    at least one run in a hundred waited as long again for something that is not the backend
    (another process on the cores, more threads than cores, a throttled clock).

    max_cv = 0.25: a coefficient of variation (std / mean) of a few percent is normal; a
    spread of a quarter of the mean is a broad slowdown that p99 / median can miss (half the
    runs 1.8x slower: p99 / median 1.3, CV 0.29) and is as large as the differences the
    table is read for (fp16 against fp32, one runtime against another). It also reacts to
    rare huge stalls among many runs (one run 10x the median in 1,000: CV 0.28), which then
    pull the mean too.

    Both limits are loose enough that a quiet run stays within them, and tight enough to
    catch contention far milder than the busy-machine case that prompted them (mean 178 ms
    and p99 2.6 s for a model that takes 14-18 ms).
    """

    max_p99_over_median: float = 2.0
    max_cv: float = 0.25

    def describe(self) -> str:
        """The limits as a reader needs them: what "unstable" meant."""
        return (f"p99 / median > {self.max_p99_over_median:g} or coefficient of variation "
                f"(std / mean) > {self.max_cv:g}, on the total time per batch")


STABILITY_LIMITS = StabilityLimits()


def stability(stats: dict[str, float], limits: StabilityLimits = STABILITY_LIMITS
              ) -> tuple[bool, Optional[str]]:
    """(stable, None) or (False, why): `stats` (one stage's summarize_ms, the total) against
    `limits`; the reason names each measured ratio past its limit, e.g. "p99 / median = 14.6
    > 2 (p99 2600 ms, median 178 ms)".

    A statistic that is missing (records written before std / cv were kept) or NaN (no runs)
    is not judged.
    """
    reasons = []
    median, p99 = stats.get("median"), stats.get("p99")
    if _finite(median) and _finite(p99) and median > 0:
        ratio = p99 / median
        if ratio > limits.max_p99_over_median:
            reasons.append(f"p99 / median = {ratio:.3g} > {limits.max_p99_over_median:g} "
                           f"(p99 {p99:.4g} ms, median {median:.4g} ms)")
    cv = stats.get("cv")
    if _finite(cv) and cv > limits.max_cv:
        reasons.append(f"CV = std / mean = {cv:.3g} > {limits.max_cv:g} "
                       f"(std {stats['std']:.4g} ms, mean {stats['mean']:.4g} ms)")
    return (not reasons, "; ".join(reasons) or None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class Stability:
    """The judgement of one configuration's timings: stable or not, why not, and the limits
    it was judged against (kept with it, so a report states what "unstable" meant even when
    the defaults have changed since). Truthy when stable."""

    stable: bool
    reason: Optional[str]
    limits: StabilityLimits

    def __bool__(self) -> bool:
        return self.stable

    @classmethod
    def of(cls, stages: dict[str, dict[str, float]],
           limits: StabilityLimits = STABILITY_LIMITS) -> "Stability":
        """Judge the total stage of `stages` against `limits`."""
        stable, reason = stability(stages["total"], limits)
        return cls(stable, reason, limits)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Stability":
        return cls(bool(doc["stable"]), doc["reason"], StabilityLimits(**doc["limits"]))


@dataclass
class LatencyResult:
    """stages: stage → statistics in ms per batch (STATISTICS); images_per_s: batch / mean
    total time; stability: whether the total times were steady enough to be read."""

    batch: int
    warmup: int
    runs: int
    stages: dict[str, dict[str, float]]
    images_per_s: float
    synchronized: bool
    stability: Stability
    # inference in its own phase (harness.eval.inference_timing), JSON; None in records
    # written before it was measured
    inference: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "LatencyResult":
        """A stored result; one stored before stability was judged (no "stability" key, no
        std / cv in its stages) is judged now, on p99 / median alone, with the default
        limits, so an older cache resumes without timing again."""
        fields = {k: doc[k] for k in cls.__dataclass_fields__
                  if k not in ("stability", "inference")}
        fields["inference"] = doc.get("inference")
        judged = doc.get("stability")
        fields["stability"] = (Stability.of(doc["stages"]) if judged is None
                               else Stability.from_json(judged))
        return cls(**fields)


def cuda_sync(device: str) -> Optional[Callable[[], None]]:
    """For a CUDA device: wait for the calling thread's current stream on it (where a
    PyTorch forward runs; TensorRT waits for its own stream itself), None for the CPU. Not
    the whole device: in a COCO pass the post-processing works on streams of its own beside
    inference, and a device-wide sync would both wait for it and break the capture of its
    CUDA graphs (harness.eval.coco_graphs) — CUDA refuses it while any stream captures."""
    if not device.startswith("cuda"):
        return None
    import torch

    dev = torch.device(device)
    return lambda: torch.cuda.current_stream(dev).synchronize()


def measure_latency(batches: Sequence[Any], preprocess: Callable[[Any], Any],
                    infer: Callable[[Any], Any], post: Callable[[Any, Any], Any],
                    settings: LatencySettings, batch_size: int,
                    sync: Optional[Callable[[], None]] = None,
                    limits: StabilityLimits = STABILITY_LIMITS) -> LatencyResult:
    """Time `settings.runs` runs of preprocess(item) → infer(prepared) → post(prepared, out)
    after `settings.warmup` untimed ones, cycling over `batches` (e.g. lists of image paths).

    The three stages run one after the other in the calling thread, so each time is that
    stage alone. `sync` (e.g. torch.cuda.synchronize) runs before a run and after inference,
    so asynchronous GPU work is inside the inference time, not the next stage's. The total
    times are judged against `limits` (see `stability`).
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
                         float("nan"), synchronized=sync is not None,
                         stability=Stability.of(stages, limits))


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
