"""Latency measurement: stages timed apart, warm-up not counted, synchronisation around
inference, statistics, defaults per device, and the machine record."""
from __future__ import annotations

import time

import numpy as np
import pytest

from harness.errors import UserError
from harness.eval.latency import (
    CPU_DEFAULTS, GPU_DEFAULTS, LatencyResult, LatencySettings, default_settings,
    machine_info, measure_latency, summarize_ms,
)


def test_summary_statistics_in_ms():
    seconds = np.arange(1, 101) / 1000.0  # 1 .. 100 ms
    s = summarize_ms(seconds)
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert all(np.isnan(v) for v in summarize_ms([]).values())


def test_defaults_per_device_and_overrides():
    assert default_settings("cuda:0") == GPU_DEFAULTS == LatencySettings(50, 1000)
    assert default_settings("cpu") == CPU_DEFAULTS
    assert CPU_DEFAULTS.runs < GPU_DEFAULTS.runs
    assert default_settings("cpu", warmup=0, runs=3) == LatencySettings(0, 3)
    with pytest.raises(UserError, match="--runs >= 1"):
        default_settings("cpu", runs=0)
    with pytest.raises(UserError, match="--warmup >= 0"):
        LatencySettings(-1, 5)


def test_stages_are_timed_apart_and_warmup_is_not_counted():
    calls = {"pre": [], "infer": 0, "post": 0, "sync": 0}

    def preprocess(item):
        calls["pre"].append(item)
        time.sleep(0.012)
        return item

    def infer(x):
        calls["infer"] += 1
        time.sleep(0.004)
        return x

    def post(x, out):
        calls["post"] += 1
        time.sleep(0.001)

    def sync():
        calls["sync"] += 1

    result = measure_latency(["a", "b", "c"], preprocess, infer, post,
                             LatencySettings(warmup=2, runs=6), batch_size=4, sync=sync)
    assert calls["infer"] == calls["post"] == 8
    assert calls["pre"] == ["a", "b", "c", "a", "b", "c", "a", "b"]  # cycles over batches
    assert calls["sync"] == 16  # before each run and after each inference
    st = result.stages
    assert set(st) == {"preprocess", "infer", "post", "total"}
    assert 12 <= st["preprocess"]["mean"] < 40
    assert 4 <= st["infer"]["mean"] < st["preprocess"]["mean"]
    assert 1 <= st["post"]["mean"] < st["infer"]["mean"]
    parts = st["preprocess"]["mean"] + st["infer"]["mean"] + st["post"]["mean"]
    assert st["total"]["mean"] == pytest.approx(parts, rel=0.05)
    assert result.images_per_s == pytest.approx(4 / (st["total"]["mean"] / 1000))
    assert (result.runs, result.warmup, result.synchronized) == (6, 2, True)
    assert LatencyResult.from_json(result.to_json()) == result


def test_no_batches_is_a_user_error():
    with pytest.raises(UserError):
        measure_latency([], lambda b: b, lambda b: b, lambda b, o: o, CPU_DEFAULTS, 1)


def test_machine_record():
    info = machine_info()
    assert info["cpu"] and isinstance(info["cpu"], str)
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert info["gpu"] is None or isinstance(info["gpu"], str)
    versions = info["versions"]
    assert versions["numpy"] == np.__version__
    assert versions["pycocotools"] and versions["python"]
    assert "tensorrt" in versions and "faster-coco-eval" in versions
