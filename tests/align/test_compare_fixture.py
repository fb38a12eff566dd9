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
    from harness.synth import generate_synthetic_coco

    out = tmp_path_factory.mktemp("compare_synth")
    generate_synthetic_coco(out, images=16, seed=5, val_fraction=0.5)
    return sorted((out / "val2017").glob("*.jpg"))


def compare(model, paths, images, layers=False):
    return run_compare(model, [open_target(p) for p in paths], images, batch=4,
                       with_layers=layers, progress=False).to_json()


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
    path = fixture_onnx(variant="end2end", nms="batched", pre_topk=40, keep_topk=40).path
    t = compare(fixture_model, [path], synth_images)["targets"][0]
    _consistent(t)
    det = t["detections"]
    assert det["causes"]["topk_cut"] > 0 and det["settings_problem"] is None
    cuts = [e for e in det["examples"] if e["cause"] == "topk_cut"]
    assert cuts and all(e["limit"] == 40 and e["rank"] >= 40 for e in cuts)
    assert all(e["side"] in ("reference", "both") for e in cuts)
    assert t["candidates"]["born"] == "in_nms"
    # both limits are settings differences, named once with both values and what they explain
    differ = {d["setting"]: d for d in det["settings_differ"]}
    assert differ["pre_topk"]["target"] == 40 and differ["pre_topk"]["explains"] > 0
    assert differ["max_detections"]["target"] == 40
    assert differ["max_detections"]["reference"] == fixture_model.nms.max_per_img


def test_planted_onnx_pre_topk_node_is_a_topk_cut_with_ranks(fixture_model, fixture_onnx,
                                                              synth_images):
    """`harness export --nms onnx --pre-topk 40` writes a real TopK before the NMS (mmdeploy's
    pre_top_k); compare reads the candidates above it and attributes its cut."""
    result = fixture_onnx(variant="end2end", nms="onnx", pre_topk=40)
    t = compare(fixture_model, [result.path], synth_images)["targets"][0]
    _consistent(t)
    assert t["pipeline"]["pre_topk_node"] and t["pipeline"]["pre_topk"] == 40
    det = t["detections"]
    cuts = [e for e in det["examples"] if e["cause"] == "topk_cut"]
    assert det["causes"]["topk_cut"] > 0 and cuts
    assert all(e["limit"] == 40 and e["rank"] >= 40 for e in cuts)
    differ = {d["setting"]: d for d in det["settings_differ"]}
    assert differ["pre_topk"]["target"] == 40


def test_settings_that_empty_the_output_are_said_once(fixture_model, fixture_onnx,
                                                      synth_images):
    """BatchedNMS with keepTopK 300 > topK 40 writes nothing: one settings cause, never
    top-k cuts with "rank 0 >= k = 0"."""
    path = fixture_onnx(variant="end2end", nms="batched", pre_topk=40).path
    doc = compare(fixture_model, [path], synth_images)
    det = doc["targets"][0]["detections"]
    assert det["target"] == 0 and det["mismatches"] == det["reference"] > 0
    assert det["causes"]["nms_settings"] == det["mismatches"]
    assert "keepTopK 300 > topK 40" in det["settings_problem"]
    assert doc["verdict"].count("keepTopK 300 > topK 40") == 1


def test_planted_score_threshold_is_one_settings_cause(fixture_model, fixture_onnx,
                                                       synth_images):
    """An export at score threshold 0.25 against mmyolo's 0.001: not hundreds of score
    edges but one settings difference; only scores within the tolerance of 0.25 are edges."""
    path = fixture_onnx(variant="end2end", nms="efficient", score_threshold=0.25).path
    doc = compare(fixture_model, [path], synth_images)
    t = doc["targets"][0]
    _consistent(t)
    det = t["detections"]
    assert det["causes"]["nms_settings"] > 100
    assert det["causes"]["score_edge"] <= 2
    (differ,) = [d for d in det["settings_differ"] if d["setting"] == "score_threshold"]
    assert differ["target"] == 0.25 and differ["reference"] == fixture_model.nms.score_thr
    assert differ["explains"] == det["causes"]["nms_settings"]
    assert "score threshold 0.25 vs 0.001" in doc["verdict"]


def _to_centre_size(src: Path, dst: Path) -> Path:
    """The end2end EfficientNMS file with its boxes turned into [cx, cy, w, h] before the
    plugin and box_coding 1, as easydeploy writes YOLOv5 files."""
    import onnx
    from onnx import helper, numpy_helper
    import numpy as np

    m = onnx.load(str(src))
    node = next(n for n in m.graph.node if n.op_type == "EfficientNMS_TRT")
    boxes = node.input[0]
    consts = {"c_lo": [0], "c_mid": [2], "c_hi": [4], "c_axis": [2], "c_half": [0.5]}
    for name, value in consts.items():
        dtype = np.float32 if name == "c_half" else np.int64
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    extra = [
        helper.make_node("Slice", [boxes, "c_lo", "c_mid", "c_axis"], ["xy1"]),
        helper.make_node("Slice", [boxes, "c_mid", "c_hi", "c_axis"], ["xy2"]),
        helper.make_node("Add", ["xy1", "xy2"], ["xy_sum"]),
        helper.make_node("Mul", ["xy_sum", "c_half"], ["cxcy"]),
        helper.make_node("Sub", ["xy2", "xy1"], ["wh"]),
        helper.make_node("Concat", ["cxcy", "wh"], ["boxes_cxcywh"], axis=2),
    ]
    node.input[0] = "boxes_cxcywh"
    for a in node.attribute:
        if a.name == "box_coding":
            a.i = 1
    at = list(m.graph.node).index(node)
    for k, n in enumerate(extra):
        m.graph.node.insert(at + k, n)
    onnx.save(m, str(dst))
    return dst


def test_centre_size_box_coding_is_converted_before_comparing(fixture_model, fixture_onnx,
                                                              synth_images, tmp_path):
    src = fixture_onnx(variant="end2end", nms="efficient").path
    path = _to_centre_size(src, tmp_path / "efficient_cxcywh.onnx")
    plain = compare(fixture_model, [src], synth_images)["targets"][0]
    coded = compare(fixture_model, [path], synth_images)["targets"][0]
    _consistent(coded)
    assert coded["pipeline"]["box_coding"] == 1
    # the same candidates as the corner file: nothing born before NMS, boxes within float noise
    assert coded["candidates"]["box_max_abs"] < 1e-3
    assert coded["detections"]["causes"] == plain["detections"]["causes"]


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


def test_planted_fp16_overflow_is_shown_as_nonfinite(fixture_model, synth_images, tmp_path):
    """Scale the prediction convs so their fp16 outputs overflow (fp32's do not): the layer
    table names the first layer with inf / NaN and how many, the verdict says it, and the
    detections decoded from inf logits (whose sigmoid looks like an ordinary 0 or 1) have
    their own cause — no false "within tolerance" and no score edges for them."""
    import copy

    import torch

    from harness.export.onnx_export import ExportSettings, export_onnx

    model = copy.copy(fixture_model)
    model.module = copy.deepcopy(fixture_model.module)
    with torch.no_grad():
        for conv in model.module.bbox_head.head_module.convs_pred:
            conv.weight.mul_(1e5)
            conv.bias.mul_(1e5)
    path = export_onnx(model, tmp_path / "overflow_fp16.onnx",
                       ExportSettings(variant="raw", precision="fp16")).path
    doc = run_compare(model, [open_target(path)], synth_images[:4], batch=4,
                      with_layers=True, progress=False).to_json()
    t = doc["targets"][0]
    bad = t["layers"]["first_nonfinite"]
    assert bad["module"].startswith("bbox_head.head_module.convs_pred")
    assert bad["target"] > 0 and bad["reference"] == 0
    assert all(r["nonfinite"] == 0 for r in t["layers"]["rows"] if r["depth"] < bad["depth"])
    assert f"inf/NaN first at {bad['module']}" in doc["verdict"]
    det = t["detections"]
    assert det["causes"]["nonfinite"] > det["mismatches"] / 2 and det["unexplained"] == 0
    examples = [e for e in det["examples"] if e["cause"] == "nonfinite"]
    assert examples and all("inf / NaN head values" in e["detail"] for e in examples)
