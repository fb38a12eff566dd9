"""export_cached reuses a file only when everything it depends on is the same: a changed
test_cfg, opset, input size, checkpoint or NMS setting gives a new export."""
from __future__ import annotations

import copy
import dataclasses

import torch

from harness.export.onnx_export import ExportSettings, export_cached, export_key


def _log(into):
    return lambda message: into.append(message)


def test_same_export_is_reused_and_any_input_change_exports_again(fixture_model, tmp_path):
    path = tmp_path / "model.onnx"
    said: list[str] = []
    raw = ExportSettings(variant="raw")
    export_cached(fixture_model, path, raw, log=_log(said))
    export_cached(fixture_model, path, raw, log=_log(said))
    assert said == [f"exporting {path}"]  # made once, then reused

    # the test_cfg as loaded (changed in code, not in the config file): an end2end file
    # takes its NMS thresholds from it, a raw file does not depend on it
    changed = copy.copy(fixture_model)
    changed.nms = dataclasses.replace(fixture_model.nms, iou_threshold=0.6, nms_pre=3840)
    assert export_key(changed, raw) == export_key(fixture_model, raw)
    e2e = ExportSettings(variant="end2end", nms="onnx")
    assert export_key(changed, e2e) != export_key(fixture_model, e2e)
    export_cached(changed, path, raw, log=_log(said))
    assert len(said) == 1  # reused: the same raw file
    export_cached(fixture_model, path, e2e, log=_log(said))
    export_cached(changed, path, e2e, log=_log(said))
    assert len(said) == 3  # the changed test_cfg gives a new end2end file

    for settings in (ExportSettings(variant="raw", opset=16),
                     ExportSettings(variant="raw", input_size=(256, 256)),
                     ExportSettings(variant="end2end", nms="efficient", keep_topk=100),
                     ExportSettings(variant="end2end", nms="efficient", keep_topk=50)):
        before = len(said)
        export_cached(fixture_model, path, settings, log=_log(said))
        assert len(said) == before + 1, settings


def test_checkpoint_contents_are_part_of_the_key(fixture_model, tmp_path):
    from harness.models.mmyolo import load_mmyolo_model

    ckpt = tmp_path / "moved.pth"
    state = {k: v.clone() for k, v in fixture_model.module.state_dict().items()}
    torch.save({"state_dict": state, "meta": {}}, ckpt)
    same = load_mmyolo_model(fixture_model.cfg_path, ckpt)
    raw = ExportSettings(variant="raw")
    key = export_key(same, raw)
    state["backbone.stem.conv.weight"] += 1e-3
    torch.save({"state_dict": state, "meta": {}}, ckpt)
    assert export_key(load_mmyolo_model(fixture_model.cfg_path, ckpt), raw) != key
