"""ΔAP split into what the numbers cost and what the NMS cost (harness.eval.delta_ap), on
planted rows: an end2end file whose ONNX NMS has a pre-NMS TopK of 30 loses AP in its NMS and
none in its numbers; an fp16 raw file (the reference's NMS) loses it in its numbers only. The
parts add up to ΔAP."""
from __future__ import annotations

import pytest

from harness.eval.runner import run_coco
from harness.experiment import Configuration
from harness.export.onnx_export import ExportSettings, export_onnx
from harness.models.config import load_model_source
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
from harness.settings import CocoSettings

pytestmark = pytest.mark.slow


def test_planted_topk_cut_is_nms_and_fp16_is_numbers(synth_val, tmp_path):
    model = load_model_source(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)
    cut = export_onnx(model, tmp_path / "topk30.onnx", ExportSettings(
        variant="end2end", nms="onnx", pre_topk=30)).path
    configs = (Configuration("torch", "cpu", "fp32", 4),
               Configuration("onnxruntime", "cpu", "fp32", 4),
               Configuration("onnxruntime", "cpu", "fp16", 4))
    settings = CocoSettings(images_dir=synth_val, annotations=None, config=FIXTURE_CONFIG,
                            checkpoint=FIXTURE_CHECKPOINT, cache_dir=tmp_path / "cache",
                            configurations=configs, onnx={"fp32": cut}, warmup=0, runs=1,
                            progress=False, evaluator="pycocotools")
    doc, _ = run_coco(settings, log=lambda m: None)
    rows = {(r.backend, r.precision): r for r in doc.rows}
    ref, topk, fp16 = rows["torch", "fp32"], rows["onnxruntime", "fp32"], \
        rows["onnxruntime", "fp16"]
    assert topk.delta_AP < -0.01, topk.delta_AP  # the TopK of 30 costs AP
    parts = topk.delta_AP_parts
    assert parts["numeric"] + parts["nms"] == pytest.approx(topk.delta_AP, abs=1e-9)
    assert abs(parts["numeric"]) <= 0.002 and parts["nms"] == pytest.approx(
        topk.delta_AP, abs=0.002), parts
    assert "through the reference's NMS" in parts["how"]
    # per COCO size range and per class the parts add up to that range's / class's ΔAP
    for size, p in parts["sizes"].items():
        assert p["numeric"] + p["nms"] == pytest.approx(getattr(topk, size) - getattr(ref, size))
    assert parts["per_class"]
    for name, p in parts["per_class"].items():
        assert p["numeric"] + p["nms"] == pytest.approx(topk.per_class[name] -
                                                        ref.per_class[name])
        assert abs(p["numeric"]) <= 0.01, (name, p)
    # by cause: a TopK of 30 costs AP through top-k cuts; restoring each cause's detections
    # gives back the NMS part, up to the causes' interaction
    by = parts["nms_by_cause"]
    assert max(by, key=lambda c: -by[c]) == "topk_cut", by
    assert parts["nms_causes"]["topk_cut"]["detections"] > 50
    assert sum(by.values()) + parts["nms_unattributed"] == pytest.approx(parts["nms"])
    assert abs(parts["nms_unattributed"]) <= 0.1 * abs(parts["nms"]), parts
    from harness.report.coco_report import delta_split_table

    split_md = delta_split_table(doc)
    assert "topk_cut -" in split_md.replace("−", "-") and "unattributed" in split_md, split_md
    f16 = fp16.delta_AP_parts
    assert f16["nms"] == 0.0 and f16["numeric"] == pytest.approx(fp16.delta_AP, abs=1e-12)
    assert "nms_by_cause" not in f16  # nothing to split: its NMS is the reference's
    assert "its NMS is the reference's" in f16["how"]
    assert ref.delta_AP_parts["nms"] == 0.0 and ref.delta_AP_parts["numeric"] == 0.0
