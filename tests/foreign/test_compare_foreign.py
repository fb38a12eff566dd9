"""`harness compare` on files other exporters made (mmdeploy 1.3.1, mmyolo easydeploy's
conventions): each layout recognised from the graph, its NMS settings read with where they
came from, its layers mapped through the exporter's wrapper scopes, and its pre-NMS TopK /
keep cuts against mmyolo's nms_pre 30000 / max_per_img 300 attributed as top-k and max-det
cuts with ranks — nothing unexplained."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.align.compare import run_compare
from harness.align.session import open_or_say_why

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from harness.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("foreign_images")
    generate_synthetic_coco(root, images=12, seed=5, val_fraction=0.5)
    return sorted((root / "val2017").glob("*.jpg"))


@pytest.fixture(scope="module")
def model():
    from harness.models.mmyolo import load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    return load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT)


def compare(model, path: Path, images, batch: int = 1):
    doc = run_compare(model, [open_or_say_why(path, "cpu")], images, batch=batch,
                      progress=False).to_json()
    (t,) = doc["targets"]
    assert t["available"], t["reason"]
    det = t["detections"]
    assert det["unexplained"] == 0, det["examples"]
    assert sum(det["causes"].values()) == det["mismatches"]
    assert t["replay_disagrees"] == 0  # the replay reproduces the file's own output
    return doc, t


@pytest.mark.parametrize("backend, kind, source", [
    ("onnxruntime", "onnx", "constant input"),
    ("tensorrt8", "EfficientNMS_TRT", "attribute"),
    ("tensorrt7", "BatchedNMSDynamic_TRT", "attribute")])
def test_easydeploy_files(easydeploy_file, model, images, backend, kind, source):
    doc, t = compare(model, easydeploy_file(backend).path, images)
    pipeline = t["pipeline"]
    assert pipeline["convention"] == "easydeploy" and pipeline["kind"] == kind
    settings = pipeline["settings"]
    threshold = settings.get("score_threshold") or settings.get("scoreThreshold")
    assert threshold["value"] == pytest.approx(0.25) and threshold["source"] == source
    # easydeploy's 0.25 against mmyolo's 0.001: one settings difference, not score edges
    det = t["detections"]
    assert det["causes"]["nms_settings"] > 0 and det["causes"]["score_edge"] <= 2
    assert any(d["setting"] == "score_threshold" for d in det["settings_differ"])
    # /baseModel/... and a head without its bbox_head scope: every layer still found
    layers = t["layers"]
    assert len(layers["rows"]) == 60 and not layers["unmapped"]
    assert layers["mapped"]["wrapper prefix"] > 0 and layers["mapped"]["scope tail"] > 0
    assert max(r["rel_l2"] for r in layers["rows"]) < 1e-4


def test_easydeploy_topk_and_keep_cuts_are_attributed_with_ranks(tmp_path, model, images):
    from tests.foreign.easydeploy_export import EasyDeployPostprocess, export_with_easydeploy

    path = tmp_path / "easydeploy_tensorrt7_cut.onnx"
    export_with_easydeploy("tensorrt7", path, EasyDeployPostprocess(
        pre_top_k=40, keep_top_k=30, score_threshold=0.001))
    _, t = compare(model, path, images)
    det = t["detections"]
    assert det["causes"]["topk_cut"] > 0 and det["causes"]["max_det_cut"] > 0
    for e in det["examples"]:
        if e["cause"] == "topk_cut":
            assert e["limit"] == 40 and e["rank"] >= 40
        if e["cause"] == "max_det_cut":
            assert e["limit"] == 30 and e["rank"] >= 30
    differ = {d["setting"]: d for d in det["settings_differ"]}
    assert differ["pre_topk"]["target"] == 40 and differ["pre_topk"]["explains"] > 0
    assert differ["max_detections"]["target"] == 30 and differ["max_detections"]["explains"] > 0
    # isNormalized 0: BatchedNMS measures IoU with +1 px; the pairs that decided are named
    assert differ["iou_formula"]["target"] == "+1 px" and differ["iou_formula"]["explains"] > 0


def test_batched_nms_keep_above_topk_is_named_not_counted_box_by_box(tmp_path, model, images):
    """keepTopK > topK: TensorRT's BatchedNMS writes nothing — the report says why once."""
    from tests.foreign.easydeploy_export import EasyDeployPostprocess, export_with_easydeploy

    path = tmp_path / "easydeploy_tensorrt7_keep_above_topk.onnx"
    export_with_easydeploy("tensorrt7", path, EasyDeployPostprocess(
        pre_top_k=20, keep_top_k=60, score_threshold=0.001))
    _, t = compare(model, path, images)
    det = t["detections"]
    assert det["target"] == 0 and det["causes"]["nms_settings"] == det["mismatches"] > 0
    assert "keepTopK 60 > topK 20" in det["settings_problem"]


@pytest.mark.parametrize("name", ["mmdeploy_ort_dynamic", "mmdeploy_trt_static"])
def test_mmdeploy_files_agree(mmdeploy_file, model, images, name):
    doc, t = compare(model, mmdeploy_file(name).path, images, batch=2 if "ort" in name else 1)
    assert t["pipeline"]["convention"] == "mmdeploy"
    assert t["detections"]["mismatches"] == 0
    assert len(t["layers"]["rows"]) == 60 and t["layers"]["mapped"]["name"] == 60
    assert "matches PyTorch" in doc["verdict"]


def test_mmdeploy_pre_topk_is_a_topk_cut_with_ranks(tmp_path, model, images):
    pytest.importorskip("mmdeploy", reason="mmdeploy is not installed")
    from tests.foreign.mmdeploy_export import MmdeployRecipe, export_with_mmdeploy

    path = tmp_path / "mmdeploy_ort_topk50.onnx"
    export_with_mmdeploy(MmdeployRecipe("detection_onnxruntime_dynamic.py",
                                        post_processing={"pre_top_k": 50}), path)
    _, t = compare(model, path, images)
    pipeline = t["pipeline"]
    assert pipeline["settings"]["pre_topk"]["value"] == 50
    assert pipeline["settings"]["pre_topk"]["source"].startswith("constant in the graph")
    det = t["detections"]
    assert det["causes"]["topk_cut"] > 0
    cuts = [e for e in det["examples"] if e["cause"] == "topk_cut"]
    assert cuts and all(e["limit"] == 50 and e["rank"] >= 50 for e in cuts)


def test_mmdeploy_keep_cut_inside_its_plugin(mmdeploy_file, model, images):
    _, t = compare(model, mmdeploy_file("mmdeploy_trt_cut").path, images)
    assert t["pipeline"]["kind"] == "TRTBatchedNMS"
    det = t["detections"]
    assert det["causes"]["max_det_cut"] > 0
    cuts = [e for e in det["examples"] if e["cause"] == "max_det_cut"]
    assert cuts and all(e["limit"] == 100 and e["rank"] >= 100 for e in cuts)


def test_mmdeploy_efficientnms_box_coding_fault_is_named(mmdeploy_file, model, images):
    """mmyolo 0.6.0's mmdeploy EfficientNMS path feeds centre-size boxes with box_coding 0:
    the report says so, instead of only counting drifted detections."""
    doc, t = compare(model, mmdeploy_file("mmdeploy_trt_efficientnms").path, images)
    assert "centre-size" in t["candidates"]["box_coding"]
    assert "its box_coding does not fit its boxes" in doc["verdict"]


def test_an_unknown_layout_is_one_line_naming_what_is_known(tmp_path, model, images,
                                                            fixture_onnx):
    import onnx

    proto = onnx.load(str(fixture_onnx(variant="end2end", nms="onnx").path))
    for o in proto.graph.output:
        o.name = o.name.upper() if o.name != "selected_indices" else "picked"
    for n in proto.graph.node:
        n.output[:] = [x.upper() if x in ("boxes", "scores") else
                       "picked" if x == "selected_indices" else x for x in n.output]
        n.input[:] = [x.upper() if x in ("boxes", "scores") else x for x in n.input]
    path = tmp_path / "renamed.onnx"
    onnx.save(proto, str(path))
    doc = run_compare(model, [open_or_say_why(path, "cpu")], images[:2],
                      progress=False).to_json()
    (t,) = doc["targets"]
    assert t["status"] == "failed"
    assert "match no layout the harness knows" in t["reason"]
    assert "easydeploy end2end (num_dets, boxes, scores, labels)" in t["reason"]
    assert "mmdeploy end2end (dets, labels)" in t["reason"]


def test_the_report_says_layout_setting_sources_mapping_and_preflight(mmdeploy_file, images,
                                                                      tmp_path):
    """`harness compare` on mmdeploy's file, through the CLI: compare.md names the layout,
    where each NMS setting was read, how the layers were mapped, and what `harness check`
    finds (mmdeploy's pre-NMS TopK of min(5000, anchors): a warning, since past 3840 anchors —
    640 x 640 has 8400 — its K is over TensorRT's limit)."""
    import json

    from harness.cli import main
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    out = tmp_path / "report"
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT),
                 str(mmdeploy_file("mmdeploy_ort_dynamic").path), "--images",
                 str(images[0].parent), "--count", "2", "--out", str(out)])
    assert code == 0
    md = (out / "compare.md").read_text()
    assert "NMS settings read from the file** (mmdeploy layout, onnx node" in md
    assert "| pre_topk | 5000 | constant in the graph, min with the count" in md
    assert "| iou_threshold | 0.6500 | constant input |" in md
    assert "mapped 60 by name; 0 not mapped" in md
    assert "## TensorRT pre-flight (`harness check`)" in md
    assert "it is at most 5000" in md and "K <= 3840" in md
    doc = json.loads((out / "results.json").read_text())["compare"]
    check = doc["targets"][0]["tensorrt_check"]
    assert check["builds"] and any(f["code"] == "topk-k-data-dependent" and
                                   f["severity"] == "warning" for f in check["findings"])
