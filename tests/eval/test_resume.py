"""Long runs lose nothing: a COCO run interrupted midway (an exception after N batches, or a
SIGKILL of the process) and run again gives the numbers of an uninterrupted run, computes
only what was missing, and stores no image twice."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.eval.runner import run_coco
from harness.settings import CocoSettings
from harness.experiment import Configuration
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

ROOT = Path(__file__).resolve().parents[2]
B1 = Configuration("torch", "cpu", "fp32", 1)
B4 = Configuration("torch", "cpu", "fp32", 4)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def settings(val: Path, cache: Path, *configs: Configuration) -> CocoSettings:
    return CocoSettings(images_dir=val, annotations=None, config=FIXTURE_CONFIG,
                        checkpoint=FIXTURE_CHECKPOINT, cache_dir=cache,
                        configurations=configs, warmup=0, runs=1, progress=False,
                        evaluator="pycocotools")


def stored_ids(path: Path) -> list[int]:
    return [r["image_id"] for r in map(json.loads, path.read_text().splitlines())
            if r.get("kind") == "image"]


@pytest.fixture(scope="module")
def clean(synth_val, tmp_path_factory) -> dict[str, dict]:
    """Uninterrupted runs at batch 1 and 4: rows by configuration key."""
    doc, _ = run_coco(settings(synth_val, tmp_path_factory.mktemp("clean"), B1, B4),
                      log=lambda m: None)
    return {f"{r['backend']}_{r['device']}_{r['precision']}_b{r['batch']}": r
            for r in doc.to_json()["rows"]}


def assert_same_numbers(row: dict, reference: dict) -> None:
    assert row["status"] == "ok"
    for key in METRICS:
        assert row[key] == reference[key], key
    assert row["per_class"] == reference["per_class"]
    assert row["images"] == reference["images"] == 12


def test_exception_midway_then_resume(synth_val, tmp_path, clean):
    cache = tmp_path / "cache"

    def crash(config, stored):
        if stored == 1:
            raise RuntimeError("simulated crash after the first batch")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_coco(settings(synth_val, cache, B4), log=lambda m: None, on_batch=crash)
    jsonl = cache / "runs" / f"{B4.key}.jsonl"
    assert len(stored_ids(jsonl)) == 4

    doc, runs = run_coco(settings(synth_val, cache, B4), log=lambda m: None)
    assert runs[0].resumed
    assert (runs[0].pass_times.skipped, runs[0].pass_times.images) == (4, 8)
    ids = stored_ids(jsonl)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 12
    assert_same_numbers(doc.to_json()["rows"][0], clean[B4.key])

    # a third run computes nothing at all
    _, runs = run_coco(settings(synth_val, cache, B4), log=lambda m: None)
    assert runs[0].pass_times.images == 0 and runs[0].pass_times.skipped == 12
    assert len(stored_ids(jsonl)) == 12
    # other latency settings: timed again, detections kept
    more = dataclasses.replace(settings(synth_val, cache, B4), runs=2)
    doc, runs = run_coco(more, log=lambda m: None)
    assert runs[0].pass_times.images == 0
    assert doc.to_json()["rows"][0]["latency_ms"] is not None
    inference = doc.to_json()["rows"][0]["inference"]  # the backend in its own phase
    assert inference["host"]["median"] > 0 and inference["runs"] == 2
    latency_lines = [r for r in map(json.loads, jsonl.read_text().splitlines())
                     if r["kind"] == "latency"]
    assert [x["result"]["runs"] for x in latency_lines] == [1, 2]
    assert_same_numbers(doc.to_json()["rows"][0], clean[B4.key])


KILLED_RUN = """
import sys, time
from pathlib import Path
from harness.eval.runner import run_coco
from harness.settings import CocoSettings
from harness.experiment import Configuration
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

settings = CocoSettings(images_dir=Path(sys.argv[1]), annotations=None,
                        config=FIXTURE_CONFIG, checkpoint=FIXTURE_CHECKPOINT,
                        cache_dir=Path(sys.argv[2]),
                        configurations=(Configuration("torch", "cpu", "fp32", 1),),
                        warmup=0, runs=1, progress=False, evaluator="pycocotools")
# a slow data set: every stored batch is followed by a pause, so the kill lands midway
run_coco(settings, log=print, on_batch=lambda config, n: time.sleep(0.3))
"""


@pytest.mark.slow
def test_sigkill_midway_then_resume(synth_val, tmp_path, clean):
    cache = tmp_path / "cache"
    jsonl = cache / "runs" / f"{B1.key}.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_RUN),
                             str(synth_val), str(cache)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.is_file() and len(stored_ids(jsonl)) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it was killed: " \
                                    f"{proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done_before = len(stored_ids(jsonl))
    assert 3 <= done_before < 12

    doc, runs = run_coco(settings(synth_val, cache, B1), log=lambda m: None)
    assert runs[0].resumed and runs[0].pass_times.skipped == done_before
    assert runs[0].pass_times.images == 12 - done_before
    ids = stored_ids(jsonl)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 12
    assert_same_numbers(doc.to_json()["rows"][0], clean[B1.key])
