"""Inference in its own phase (harness.eval.inference_timing): host end-to-end around
backend.infer on one resident batch, the backend's compute figure where it has one (PyTorch:
the forward alone; onnxruntime: IO binding), transfers as their difference; and the coco row
and coco.md carrying them with what each column times."""
from __future__ import annotations

import time

import numpy as np
import pytest

from harness.eval.inference_timing import WHAT, InferenceTiming, time_host, time_inference
from harness.eval.latency import LatencySettings


class SleepyBackend:
    """infer sleeps 4 ms (copies and conversions), of which the 'compute' is 3 ms."""

    def __init__(self, compute: bool = True):
        self.calls = 0
        if not compute:
            self.compute_runs = None

    def infer(self, inputs, metas=None):
        self.calls += 1
        time.sleep(0.004)
        return {"out": inputs.sum()}

    def compute_runs(self, inputs, metas, warmup, runs):
        return [0.003] * runs, "a stand-in"


def test_host_compute_transfers_and_warmup():
    backend = SleepyBackend()
    x = np.zeros((2, 3, 8, 8), np.float32)
    t = time_inference(backend, x, None, LatencySettings(warmup=3, runs=10))
    assert backend.calls == 13  # warm-up runs are made, not counted
    assert t.batch == 2 and t.runs == 10 and t.warmup == 3
    assert 3.9 <= t.host["median"] <= 20
    assert t.compute["median"] == pytest.approx(3.0)
    assert t.transfers["median"] == pytest.approx(t.host["median"] - 3.0)
    assert t.images_per_s == pytest.approx(2 / (t.host["median"] / 1000))
    doc = t.to_json()
    assert doc["what"] == WHAT and InferenceTiming.from_json(doc) == t
    none = time_inference(SleepyBackend(compute=False), x, None, LatencySettings(0, 2))
    assert none.compute is None and none.transfers is None


def test_sync_runs_inside_the_timed_span():
    order = []
    times = time_host(lambda: order.append("run"), LatencySettings(1, 2),
                      sync=lambda: order.append("sync"))
    assert order == ["run", "sync"] * 3 and len(times) == 2


def test_real_backends_time_their_forward(tmp_path):
    """PyTorch (the clock around the forward on the CPU) and onnxruntime (IO binding) give a
    compute figure next to the host one."""
    from harness.align.session import default_target
    from harness.backends.onnxruntime_backend import OnnxruntimeBackend
    from harness.backends.torch_backend import TorchBackend
    from harness.models.config import load_model_source
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    model = load_model_source(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    for backend in (TorchBackend(model, outputs="raw"),
                    OnnxruntimeBackend(default_target(model, tmp_path), provider="cpu")):
        backend.load()
        t = time_inference(backend, x, None, LatencySettings(1, 3))
        assert t.compute is not None and t.compute["median"] > 0, type(backend).__name__
        assert "CPU" in t.compute_method or "cpu" in t.compute_method
