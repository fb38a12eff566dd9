"""The compare run on the fixture detector and synthetic images, with real onnxruntime
sessions: fp32 files agree with PyTorch, and each planted difference (a pre-NMS top-k far
below nms_pre, keep-topk below max_per_img, an IoU threshold moved by 0.01, fp16) is found,
attributed to its cause, and nothing is left unexplained."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.align.compare import run_compare
from harness.align.detections import CAUSES
from harness.align.targets import open_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth_images(tmp_path_factory) -> list[Path]:
    from harness.data.synth import generate_synthetic_coco

    out = tmp_path_factory.mktemp("compare_synth")
    generate_synthetic_coco(out, images=16, seed=5, val_fraction=0.5)
    return sorted((out / "val2017").glob("*.jpg"))


def compare(model, paths, images, layers=False):
    return run_compare(model, [open_target(p) for p in paths], images, batch=4,
                       with_layers=layers, progress=False)


def _consistent(target):
    det = target["detections"]
    assert sum(det["causes"].values()) == det["mismatches"]
    assert set(det["causes"]) == set(CAUSES)
    assert det["unexplained"] == 0, det["examples"]
    assert target["replay_disagrees"] == 0


def test_fp32_raw_and_end2end_onnx_nms_agree_with_pytorch(fixture_model, fixture_onnx,
                                                          synth_images):
    raw = fixture_onnx(variant="raw").path
    e2e = fixture_onnx(variant="end2end", nms="onnx").path
    doc = compare(fixture_model, [raw, e2e], synth_images, layers=True)
    t_raw, t_e2e = doc["targets"]
    for t in (t_raw, t_e2e):
        _consistent(t)
        layers = t["layers"]
        # every ConvModule and head conv of YOLOv5-n is mapped and compared
        assert len(layers["rows"]) >= 50 and not layers["skipped"]
        assert layers["first_past_tolerance"] is None
        assert max(r["rel_l2"] for r in layers["rows"]) < 1e-5
    assert t_raw["detections"]["mismatches"] == 0 and t_raw["detections"]["reference"] > 50
    assert t_raw["candidates"]["born"] == "none"
    # ONNX NonMaxSuppression keeps up to keep_topk per class and has no overall cap: the
    # only differences allowed are mmyolo's max_per_img cut
    causes = t_e2e["detections"]["causes"]
    assert all(n == 0 for c, n in causes.items() if c != "max_det_cut")
    assert doc["inputs"]["count"] == len(synth_images) and len(doc["inputs"]["sha256"]) == 2


def test_planted_pre_topk_cut_is_attributed_with_ranks(fixture_model, fixture_onnx,
                                                       synth_images):
    path = fixture_onnx(variant="end2end", nms="batched", pre_topk=40).path
    t = compare(fixture_model, [path], synth_images)["targets"][0]
    _consistent(t)
    det = t["detections"]
    assert det["causes"]["topk_cut"] > 0
    cuts = [e for e in det["examples"] if e["cause"] == "topk_cut"]
    assert cuts and all(e["limit"] == 40 and e["rank"] >= 40 for e in cuts)
    assert all(e["side"] in ("reference", "both") for e in cuts)
    assert t["candidates"]["born"] == "in_nms"


def test_planted_keep_topk_is_a_max_detections_cut(fixture_model, fixture_onnx,
                                                   synth_images):
    path = fixture_onnx(variant="end2end", nms="efficient", keep_topk=100).path
    t = compare(fixture_model, [path], synth_images)["targets"][0]
    _consistent(t)
    det = t["detections"]
    assert det["causes"]["max_det_cut"] > 0 and det["target"] <= 100 * len(synth_images)
    cuts = [e for e in det["examples"] if e["cause"] == "max_det_cut"]
    assert cuts and all(e["limit"] == 100 and e["rank"] >= 100 for e in cuts)


def test_planted_iou_threshold_change_is_an_iou_edge(fixture_model, fixture_onnx,
                                                     synth_images):
    iou = fixture_model.nms.iou_threshold + 0.01
    path = fixture_onnx(variant="end2end", nms="onnx", iou_threshold=iou).path
    t = compare(fixture_model, [path], synth_images)["targets"][0]
    _consistent(t)
    causes = t["detections"]["causes"]
    assert causes["iou_edge"] > 0
    assert all(n == 0 for c, n in causes.items() if c not in ("iou_edge", "max_det_cut"))


def test_planted_fp16_drifts_and_names_the_first_divergent_layer(fixture_model, fixture_onnx,
                                                                  synth_images):
    path = fixture_onnx(variant="raw", precision="fp16").path
    t = compare(fixture_model, [path], synth_images, layers=True)["targets"][0]
    _consistent(t)
    assert t["precision"] == "fp16"
    first = t["layers"]["first_divergence"]
    assert first is not None and first["depth"] == 0 and first["rel_l2"] > 1e-4
    causes = t["detections"]["causes"]
    assert causes["drift"] + causes["score_edge"] > 0
    assert t["candidates"]["born"] == "before_nms"
