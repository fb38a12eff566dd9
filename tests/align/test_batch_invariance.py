"""Batch invariance in compare (harness.align.batch_invariance): every image run again alone
and diffed against its in-batch detections. The fixture on PyTorch and onnxruntime fp32 on
the CPU changes nothing; a planted backend whose scores depend on the batch size is caught,
with causes, in results, report, verdict and the max_batch_variant gate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.align.compare import run_compare
from harness.align.session import default_target
from harness.align.targets import Target, open_target
from harness.backends.onnxruntime_backend import OnnxruntimeBackend
from harness.models.config import load_model_source
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
from tests.conftest import synth_val_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return synth_val_images(tmp_path_factory, "invariance_synth", images=16, seed=11)


class BatchDependent(OnnxruntimeBackend):
    """onnxruntime whose class logits move by 0.3 when it runs more than one image: what a
    kernel chosen per batch size (or a batch-coupled op) does to a deployed model."""

    def infer(self, inputs, metas=None):
        out = super().infer(inputs, metas)
        if inputs.shape[0] > 1:
            out = {k: (v + np.float32(0.3) if k.startswith("cls_scores") else v)
                   for k, v in out.items()}
        return out


def test_fixture_is_batch_invariant_and_a_batch_dependent_backend_is_caught(images, tmp_path):
    from harness.gates.limits import evaluate, parse_gates
    from harness.report.compare_report import render_compare
    from harness.results import Results

    model = load_model_source(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    path = default_target(model, tmp_path)
    planted = BatchDependent(path, provider="cpu")
    planted.load()
    targets = [open_target(path),
               Target(path.with_name("planted.onnx"), "onnx", planted, onnx_path=path)]
    doc = run_compare(model, targets, images, batch=4, with_layers=False, work_dir=tmp_path,
                      progress=False)
    ref = doc.reference["batch_invariance"]
    fine, bad = (t.batch_invariance for t in doc.targets)
    assert ref["images"] == fine["images"] == bad["images"] == len(images)
    assert ref["changed_images"] == 0 and fine["changed_images"] == 0
    assert ref["padded"]["changed_images"] == 0 and fine["padded"]["changed_images"] == 0
    # beside padding images the planted backend still runs a batch of 4: it changes too
    assert bad["padded"]["changed_images"] > 0
    # onnxruntime on the CPU: bit-identical on an Intel Xeon; on an AMD EPYC its kernels for
    # batch 1 and 4 differ by a float32 ulp (2.3e-10) — far below the planted 0.3
    assert fine["max_score_change"] < 1e-8
    assert ref["max_score_change"] < 1e-5  # PyTorch: float noise, nothing beyond tolerance
    assert bad["changed_images"] > 0 and bad["detections_changed"] > 0
    assert bad["max_score_change"] > 1e-3
    assert bad["causes"] and "unexplained" not in bad["causes"], bad["causes"]
    assert "planted.onnx is not batch-invariant" in doc.verdict
    assert "yolov5_n_synth_320_raw_fp32.onnx is not batch-invariant" not in doc.verdict
    assert "### Batch invariance" in render_compare(doc)
    results = Results.from_json({"compare": doc.to_json()})
    checks = evaluate(parse_gates({"max_batch_variant": 0}, "test"), results, "results.json")
    by = {c.configuration: c for c in checks}
    assert not by["planted.onnx"] and by["planted.onnx"].value > 0
    assert "images change between batch 1 and batch 4" in by["planted.onnx"].detail
    assert by[path.name] and by[path.name].value == 0


def test_batch_one_measures_nothing(images, tmp_path):
    model = load_model_source(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    doc = run_compare(model, [open_target(default_target(model, tmp_path))], images[:2],
                      batch=1, with_layers=False, work_dir=tmp_path, progress=False)
    assert doc.reference["batch_invariance"] is None
    assert doc.targets[0].batch_invariance is None
