"""Inference timed in its own phase, the way trtexec times an engine: one preprocessed batch
kept resident, back-to-back runs after warm-up, nothing else on the thread. Three figures:

- **host end-to-end**: `backend.infer(inputs)` — numpy in, numpy out, every copy and
  conversion the backend does included (what an application calling the backend sees);
- **compute**: the forward alone on inputs already where the model runs and outputs left
  there — CUDA events around the forward / enqueue on a GPU (PyTorch; onnxruntime through IO
  binding), the plain clock on a CPU — where the backend offers it (`compute_runs`);
- **transfers**: host end-to-end minus compute, per statistic (the copies in and out and the
  conversions), when both were measured.

Each with mean, median, p90, p99 (ms per batch) and throughput = batch / median. The
per-stage pipeline table of `harness coco` (preprocess, infer, post on one thread, interleaved)
stays as the "in a real pipeline" view; this is the figure to compare backends by.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness.eval.latency import LatencySettings, summarize_ms

# what each figure times, for results.json and the reports
WHAT = {
    "host": "backend.infer on a resident preprocessed batch: numpy in → numpy out, copies "
            "and conversions included, back-to-back runs",
    "compute": "the forward alone, inputs already on the device and outputs left there "
               "(CUDA events on a GPU, the clock on a CPU)",
    "transfers": "host end-to-end minus compute, statistic by statistic",
}


@dataclass
class InferenceTiming:
    """One configuration's inference phase. Statistics in ms per batch (summarize_ms);
    compute / transfers None where the backend does not time its forward apart."""

    batch: int
    warmup: int
    runs: int
    host: dict[str, float]
    compute: Optional[dict[str, float]]
    transfers: Optional[dict[str, float]]
    images_per_s: float
    compute_method: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "what": WHAT}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "InferenceTiming":
        return cls(**{k: doc.get(k) for k in cls.__dataclass_fields__})


def time_host(infer: Callable[[], Any], settings: LatencySettings,
              sync: Optional[Callable[[], None]] = None) -> list[float]:
    """Seconds of each of `settings.runs` back-to-back calls of `infer` after
    `settings.warmup` untimed ones; `sync` (a device synchronise) after each call, inside
    the timed span, so queued device work is counted."""
    clock = time.perf_counter
    out: list[float] = []
    for i in range(settings.warmup + settings.runs):
        t0 = clock()
        infer()
        if sync is not None:
            sync()
        t1 = clock()
        if i >= settings.warmup:
            out.append(t1 - t0)
    return out


def time_inference(backend: Any, inputs: np.ndarray, metas: Optional[Sequence[Any]],
                   settings: LatencySettings, sync: Optional[Callable[[], None]] = None
                   ) -> InferenceTiming:
    """The inference phase of `backend` on one batch (see the module docstring). The
    backend's `compute_runs(inputs, metas, warmup, runs) -> (seconds per run, method)`, where
    it has one, gives the compute figure."""
    host_s = time_host(lambda: backend.infer(inputs, metas), settings, sync)
    host = summarize_ms(host_s)
    compute = transfers = None
    method = None
    runner = getattr(backend, "compute_runs", None)
    if runner is not None:
        found = runner(inputs, metas, settings.warmup, settings.runs)
        if found is not None:
            seconds, method = found
            compute = summarize_ms(seconds)
            transfers = {k: host[k] - compute[k] for k in ("mean", "median", "p90", "p99")}
    batch = int(inputs.shape[0])
    median_s = host["median"] / 1000.0
    return InferenceTiming(batch=batch, warmup=settings.warmup, runs=settings.runs, host=host,
                           compute=compute, transfers=transfers,
                           images_per_s=batch / median_s if median_s else float("nan"),
                           compute_method=method)
