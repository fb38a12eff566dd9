"""The nms_pre / TopK workflow: the PyTorch reference run with a deployed TopK's K
(`--nms-pre`), the candidates a TopK sees per image, and a coco matrix axis over nms_pre
with the table of what each cut costs."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from harness.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("nms_pre")
    generate_synthetic_coco(root, images=8, seed=4, val_fraction=0.5)
    return root / "val2017"


def test_compare_with_the_reference_aligned_to_a_topk(images, tmp_path, capsys,
                                                       fixture_onnx):
    out = tmp_path / "report"
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT),
                 str(fixture_onnx(variant="raw").path), "--images", str(images),
                 "--count", "4", "--no-layers", "--nms-pre", "40", "--out", str(out)])
    assert code == 0, capsys.readouterr()
    doc = json.loads((out / "results.json").read_text())["compare"]
    assert doc["model"]["nms"]["nms_pre"] == 40
    assert doc["model"]["nms_changed"] == {"nms_pre": [30000, 40]}
    # mmyolo's own output used the changed test_cfg too: the replay reproduces it
    assert doc["reference"]["replay_check"]["differ_outside_ties"] == 0
    pressure = doc["reference"]["candidates_before_topk"]
    assert pressure["nms_pre"] == 40 and len(pressure["per_image"]) == 4
    assert pressure["images_cut_by_nms_pre"] == sum(p["candidates"] > 40
                                                    for p in pressure["per_image"]) > 0
    assert doc["targets"][0]["detections"]["mismatches"] == 0  # both sides cut at 40
    md = (out / "compare.md").read_text()
    assert "### Candidates before the pre-NMS TopK" in md
    assert "the reference ran with nms_pre 40 (config: 30000)" in md


def test_coco_matrix_axis_over_nms_pre(images, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["coco", str(images), "--backends", "torch", "onnxruntime", "--precisions",
                 "fp32", "--batches", "2", "--nms-pre", "30000", "40", "5", "--runs", "2",
                 "--warmup", "0", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())["coco"]["rows"]
    ap = {(r["backend"], r["nms_pre"]): r["AP"] for r in rows}
    assert set(ap) == {(b, n) for b in ("torch", "onnxruntime") for n in (30000, 40, 5)}
    assert ap[("torch", 5)] < ap[("torch", 40)] < ap[("torch", 30000)]
    # ΔAP compares a backend with PyTorch at the same nms_pre: the cut is not the runtime's
    for r in rows:
        if r["backend"] == "onnxruntime":
            assert abs(r["delta_AP"]) < 2e-3, r
    md = (out / "coco.md").read_text()
    assert "## AP by nms_pre" in md
    line = next(x for x in md.splitlines() if x.startswith("| torch cpu fp32 b2 |"))
    assert f"({ap[('torch', 5)] - ap[('torch', 30000)]:+.4f})" in line
