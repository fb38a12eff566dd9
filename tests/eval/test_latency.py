"""Latency measurement: stages timed apart, warm-up not counted, synchronisation around
inference, statistics, the stability judgement on planted timings, defaults per device, and
the machine record."""
from __future__ import annotations

import time

import numpy as np
import pytest

from harness.errors import UserError
from harness.eval import latency
from harness.eval.latency import (
    CPU_DEFAULTS, GPU_DEFAULTS, STABILITY_LIMITS, LatencyResult, LatencySettings, Stability,
    StabilityLimits, default_settings, machine_info, measure_latency, stability, summarize_ms,
)


def test_summary_statistics_in_ms():
    seconds = np.arange(1, 101) / 1000.0  # 1 .. 100 ms
    s = summarize_ms(seconds)
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["std"] == pytest.approx(np.sqrt((100 ** 2 - 1) / 12))  # population std
    assert s["cv"] == pytest.approx(s["std"] / 50.5)
    assert all(np.isnan(v) for v in summarize_ms([]).values())
    assert summarize_ms([0.02])["std"] == 0.0


# -- stability on planted timings (seconds per run, no clock involved) -----------------------

def steady_seconds(n: int = 200, median_ms: float = 16.0) -> np.ndarray:
    """A quiet machine: every run within ±5 % of the median, evenly spread."""
    return median_ms / 1000.0 * (1.0 + 0.05 * np.sin(np.arange(n)))


def busy_seconds(n: int = 200, outliers: int = 4) -> np.ndarray:
    """The steady runs with a few runs stalled far beyond them (the 2.6 s of the finding)."""
    seconds = steady_seconds(n)
    seconds[:: n // outliers] = 2.6
    return seconds


def test_steady_timings_are_stable():
    stats = summarize_ms(steady_seconds())
    assert stability(stats) == (True, None)
    assert stats["cv"] < 0.05


def test_a_few_huge_outliers_are_flagged_with_ratio_and_limit():
    stats = summarize_ms(busy_seconds())
    stable, reason = stability(stats)
    assert not stable
    ratio = stats["p99"] / stats["median"]
    assert ratio > 100  # 2.6 s against 16 ms
    assert f"p99 / median = {ratio:.3g} > 2 " in reason
    assert f"CV = std / mean = {stats['cv']:.3g} > 0.25" in reason


def test_a_broad_slowdown_is_flagged_by_cv_alone():
    # half the runs 1.8x slower: p99 / median stays below 2, the spread does not
    seconds = np.r_[np.full(100, 0.010), np.full(100, 0.018)]
    stats = summarize_ms(seconds)
    assert stats["p99"] / stats["median"] < STABILITY_LIMITS.max_p99_over_median
    stable, reason = stability(stats)
    assert not stable and reason.startswith("CV = std / mean = 0.286 > 0.25")
    assert "p99" not in reason


def test_limits_are_data_and_described():
    assert STABILITY_LIMITS == StabilityLimits(max_p99_over_median=2.0, max_cv=0.25)
    strict = StabilityLimits(max_p99_over_median=1.01, max_cv=0.01)
    stable, reason = stability(summarize_ms(steady_seconds()), strict)
    assert not stable and "> 1.01" in reason and "> 0.01" in reason
    assert STABILITY_LIMITS.describe() == ("p99 / median > 2 or coefficient of variation "
                                           "(std / mean) > 0.25, on the total time per batch")
    assert stability(summarize_ms([])) == (True, None)  # nothing timed: nothing to judge


class PlantedClock:
    """time.perf_counter for measure_latency: advances only when a stage says how long it
    took, so the timings are exactly the planted ones."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("planted, stable", [(steady_seconds(50), True),
                                             (busy_seconds(50, outliers=2), False)])
def test_measured_result_records_the_judgement(monkeypatch, planted, stable):
    clock = PlantedClock()
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    warmup = 3
    infer_s = iter([0.016] * warmup + list(planted))
    result = measure_latency(["a"], lambda b: b, lambda b: clock.spend(next(infer_s)),
                             lambda b, o: None, LatencySettings(warmup=warmup, runs=50),
                             batch_size=1)
    assert result.stages["total"] == pytest.approx(summarize_ms(planted))  # clock rounding
    assert bool(result.stability) is stable
    assert result.stability.limits == STABILITY_LIMITS
    assert (result.stability.reason is None) is stable
    doc = result.to_json()
    assert doc["stability"] == {"stable": stable, "reason": result.stability.reason,
                                "limits": {"max_p99_over_median": 2.0, "max_cv": 0.25}}
    assert LatencyResult.from_json(doc) == result


def test_a_result_stored_before_stability_was_judged_still_loads():
    # a latency record as RunStore kept it before std / cv / stability existed
    old_total = {"mean": 178.0, "median": 16.0, "p90": 20.0, "p99": 2600.0}
    old = {"batch": 1, "warmup": 5, "runs": 50, "synchronized": False, "images_per_s": 5.6,
           "stages": {s: dict(old_total) for s in ("preprocess", "infer", "post", "total")}}
    result = LatencyResult.from_json(old)
    assert result.stages == old["stages"]
    assert not result.stability and "p99 / median = 162 > 2" in result.stability.reason
    assert "CV" not in result.stability.reason  # no std kept: not judged on it
    quiet = dict(old, stages={s: dict(old_total, p99=18.0) for s in old["stages"]})
    assert LatencyResult.from_json(quiet).stability == Stability(True, None, STABILITY_LIMITS)


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
    assert isinstance(result.stability.stable, bool)  # the verdict itself: not timed here
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
