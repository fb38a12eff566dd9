"""MmyoloModel is a ModelSource: it passes the runtime protocol check, and every protocol
member works on the fixture model and agrees with the stages that use it (the exported files'
output names, the PyTorch backend, layer selection, mmyolo's own post-processing).

A new model source copies this file and swaps the fixture (docs/model-sources.md)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.backends import TorchBackend
from harness.export.outputs import variant_of
from harness.export.variants import END2END_OUTPUTS
from harness.models.source import DecodedCandidates, ModelSource, NmsSettings

def rows(result) -> np.ndarray:
    """(K, 6) [label, score, x1, y1, x2, y2] in a canonical order (tied scores may come out
    in either order from two implementations)."""
    r = np.concatenate([result.labels[:, None].astype(np.float64),
                        result.scores[:, None].astype(np.float64),
                        result.boxes.astype(np.float64)], axis=1)
    return r[np.lexsort(r.T[::-1])]


@pytest.fixture(scope="module")
def head(fixture_model, fixture_batch):
    """The fixture's raw outputs for the batch as numpy arrays (what any backend returns)."""
    return TorchBackend(fixture_model, outputs="raw").infer(fixture_batch.inputs)


def test_is_a_model_source(fixture_model):
    assert isinstance(fixture_model, ModelSource)
    assert not isinstance(object(), ModelSource)
    members = {*ModelSource.__annotations__, *(n for n in dir(ModelSource)
                                                if not n.startswith("_"))}
    assert {"module", "head_outputs", "framework_detections", "export_module"} <= members
    every = SimpleNamespace(**{n: getattr(fixture_model, n) for n in members})
    assert isinstance(every, ModelSource)
    for missing in ("nms", "decode"):  # a source without one member is not one
        partial = SimpleNamespace(**{n: getattr(fixture_model, n) for n in members
                                     if n != missing})
        assert not isinstance(partial, ModelSource), missing


def test_identity_and_settings(fixture_model):
    m = fixture_model
    assert (m.family, m.framework, m.head_type) == ("yolov5", "mmyolo", "YOLOv5Head")
    assert m.num_classes == len(m.class_names) == 5
    assert m.cfg_path.endswith("yolov5_n_synth_320.py") and m.ckpt_path.endswith(".pth")
    assert isinstance(m.nms, NmsSettings) and m.nms.score_thr < 0.01
    assert m.preprocess.describe()
    assert m.device == "cpu" and next(m.module.parameters()).device.type == "cpu"
    described = json.loads(json.dumps(m.describe()))
    assert described["family"] == "yolov5" and described["class_names"] == list(m.class_names)


def test_copy_to_converts_a_copy(fixture_model, fixture_batch):
    half = fixture_model.copy_to("cpu", torch.float16)
    assert isinstance(half, ModelSource) and half.device == "cpu"
    assert next(half.module.parameters()).dtype == torch.float16
    assert next(fixture_model.module.parameters()).dtype == torch.float32
    assert half.nms == fixture_model.nms and half.class_names == fixture_model.class_names
    out = half.head_outputs(torch.from_numpy(fixture_batch.inputs[:1]).half())
    assert all(v.dtype == torch.float16 for v in out.values())


def test_head_and_decoded_outputs_are_the_files_outputs(fixture_model, fixture_onnx,
                                                        fixture_batch):
    x = torch.from_numpy(fixture_batch.inputs)
    with torch.no_grad():
        head = fixture_model.head_outputs(x)
        decoded = fixture_model.decoded_outputs(head)
    assert list(head) == fixture_onnx(variant="raw").metadata["outputs"]
    assert list(decoded) == fixture_onnx(variant="decoded").metadata["outputs"]
    assert head["cls_scores.0"].shape == (4, 15, 40, 40)  # 3 anchors x 5 classes, stride 8
    assert decoded["boxes"].shape == (4, 6300, 4) and decoded["scores"].shape == (4, 6300, 5)
    assert decoded["objectness"].shape == (4, 6300)
    assert all(torch.is_tensor(v) for v in [*head.values(), *decoded.values()])


def test_export_modules(fixture_model, fixture_batch):
    x = torch.from_numpy(fixture_batch.inputs[:2])
    for variant in ("raw", "decoded"):
        module = fixture_model.export_module(variant)
        assert isinstance(module, torch.nn.Module)
        # the detector's submodules under their own paths: ONNX scopes = module paths
        assert [n for n, _ in module.named_children()] == ["backbone", "neck", "bbox_head"]
        assert set(module.state_dict()) == set(fixture_model.module.state_dict())
        with torch.no_grad():
            named = module.forward_named(x)
            values = module(x)
            head = fixture_model.head_outputs(x)
            want = head if variant == "raw" else fixture_model.decoded_outputs(head)
        assert list(named) == list(want)
        for got, (name, ref) in zip(values, want.items()):
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="end2end"):
        fixture_model.export_module("end2end")


def test_output_variant(fixture_model, fixture_onnx):
    raw = fixture_onnx(variant="raw").metadata["outputs"]
    decoded = fixture_onnx(variant="decoded").metadata["outputs"]
    assert fixture_model.output_variant(raw) == "raw"
    assert fixture_model.output_variant(decoded) == "decoded"
    assert fixture_model.output_variant(raw + decoded) == "decoded"  # the backend's "all"
    assert fixture_model.output_variant(END2END_OUTPUTS["efficient"]) is None
    assert variant_of(raw, fixture_model) == variant_of(raw) == ("raw", None)
    assert variant_of(END2END_OUTPUTS["onnx"], fixture_model) == ("end2end", "onnx")


def test_decode_from_raw_decoded_or_torch_outputs(fixture_model, fixture_batch, head):
    from_raw = fixture_model.decode(head)
    assert isinstance(from_raw, DecodedCandidates)
    assert from_raw.boxes.shape == (4, 6300, 4) and from_raw.objectness.shape == (4, 6300)
    decoded = TorchBackend(fixture_model, outputs="decoded").infer(fixture_batch.inputs)
    from_decoded = fixture_model.decode(decoded)
    assert from_decoded.boxes is decoded["boxes"]  # taken as they are
    np.testing.assert_array_equal(from_raw.boxes, from_decoded.boxes)
    np.testing.assert_array_equal(from_raw.scores, from_decoded.scores)
    from_torch = fixture_model.decode({k: torch.from_numpy(v) for k, v in head.items()})
    np.testing.assert_array_equal(from_torch.objectness, from_raw.objectness)
    # raw_outputs' grouped form, as callers before the protocol pass it
    grouped = fixture_model.decode(fixture_model.raw_outputs(fixture_batch.inputs))
    np.testing.assert_array_equal(grouped.scores, from_raw.scores)


def test_detections_agree_with_mmyolo_and_predict(fixture_model, fixture_batch, head):
    ours = fixture_model.detections(fixture_model.decode(head), fixture_batch.metas,
                                    trace=True)
    theirs = fixture_model.framework_detections(head, fixture_batch.metas)
    predicted = fixture_model.predict(fixture_batch)
    assert len(ours) == len(theirs) == len(predicted) == 4
    for i, (a, b, p) in enumerate(zip(ours, theirs, predicted)):
        assert a.trace is not None and (b.box_index == -1).all()
        assert (a.scores > 0.3).sum() >= 3, "fixture premise: confident detections"
        np.testing.assert_allclose(rows(a), rows(b), atol=1e-3, err_msg=f"image {i}")
        np.testing.assert_array_equal(rows(a), rows(p))
        # boxes in original pixels: inside the image
        h, w = fixture_batch.metas[i].ori_shape
        assert (a.boxes[:, 2] <= w).all() and (a.boxes[:, 3] <= h).all()


def test_default_layers_are_module_paths(fixture_model):
    layers = fixture_model.default_layers()
    names = {n for n, _ in fixture_model.module.named_modules()}
    assert layers and set(layers) <= names
    assert layers[0] == "backbone.stem" and "bbox_head.head_module.convs_pred.2" in layers
    # every ConvModule and every conv outside one (the head's prediction convs): 60 for
    # YOLOv5-n, what compare.md reported before the protocol
    assert len(layers) == 60


def test_single_stage_has_no_proposals(fixture_model, fixture_batch, head):
    assert fixture_model.proposals(head, fixture_batch.metas) is None
