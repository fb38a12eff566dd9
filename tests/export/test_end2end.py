"""end2end files: each NMS choice, run through onnxruntime (+ the reference kernel for the
TensorRT plugins), gives the detections its semantics gives on PyTorch's own candidates; fp16
and int8 files run at batch 1 and 4 and still find the fixture's objects."""
from __future__ import annotations

import numpy as np
import pytest

from harness.backends import OnnxruntimeBackend, TorchBackend
from harness.export.outputs import detections_from_outputs
from harness.nms import batched_nms_trt, efficient_nms_trt, onnx_non_max_suppression


def torch_candidates(model, inputs):
    """PyTorch CPU decoded candidates as the end2end graph feeds them to NMS:
    boxes (B, N, 4) xyxy, scores (B, N, C) = class probability x objectness."""
    out = TorchBackend(model, outputs="decoded").infer(inputs)
    scores = out["scores"]
    if "objectness" in out:
        scores = scores * out["objectness"][..., None]
    return out["boxes"], scores


def test_efficient_nms_file_equals_reference_on_torch_candidates(fixture_model, fixture_onnx,
                                                                 fixture_batch):
    result = fixture_onnx(variant="end2end", nms="efficient")
    got = OnnxruntimeBackend(result.path, provider="cpu").infer(fixture_batch.inputs)
    boxes, scores = torch_candidates(fixture_model, fixture_batch.inputs)
    nms = result.metadata["nms"]
    ref = efficient_nms_trt(boxes, scores, score_threshold=nms["score_threshold"],
                            iou_threshold=nms["iou_threshold"],
                            max_output_boxes=nms["keep_topk"])
    assert ref.num_detections.min() > 0
    np.testing.assert_array_equal(got["num_detections"], ref.num_detections)
    np.testing.assert_array_equal(got["detection_classes"], ref.detection_classes)
    np.testing.assert_allclose(got["detection_boxes"], ref.detection_boxes, rtol=1e-5,
                               atol=1e-3)
    np.testing.assert_allclose(got["detection_scores"], ref.detection_scores, rtol=1e-4,
                               atol=1e-6)


def test_batched_nms_file_equals_reference_on_torch_candidates(fixture_model, fixture_onnx,
                                                               fixture_batch):
    result = fixture_onnx(variant="end2end", nms="batched")
    got = OnnxruntimeBackend(result.path, provider="cpu").infer(fixture_batch.inputs)
    boxes, scores = torch_candidates(fixture_model, fixture_batch.inputs)
    nms = result.metadata["nms"]
    # the attributes easydeploy's TENSORRT7 backend writes (docs/nms-semantics.md)
    ref = batched_nms_trt(boxes[:, :, None], scores, top_k=nms["pre_topk"],
                          keep_top_k=nms["keep_topk"], score_threshold=nms["score_threshold"],
                          iou_threshold=nms["iou_threshold"], share_location=True,
                          is_normalized=False, clip_boxes=False, caffe_semantics=True)
    assert ref.num_detections.min() > 0
    np.testing.assert_array_equal(got["num_detections"], ref.num_detections)
    np.testing.assert_array_equal(got["nmsed_classes"], ref.nmsed_classes)
    np.testing.assert_allclose(got["nmsed_boxes"], ref.nmsed_boxes, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got["nmsed_scores"], ref.nmsed_scores, rtol=1e-4, atol=1e-6)


def test_onnx_nms_file_equals_reference_on_torch_candidates(fixture_model, fixture_onnx,
                                                            fixture_batch):
    result = fixture_onnx(variant="end2end", nms="onnx")
    got = OnnxruntimeBackend(result.path, provider="cpu").infer(fixture_batch.inputs)
    boxes, scores = torch_candidates(fixture_model, fixture_batch.inputs)
    np.testing.assert_allclose(got["boxes"], boxes, rtol=1e-5, atol=1e-3)
    nms = result.metadata["nms"]
    ref = onnx_non_max_suppression(boxes, scores.transpose(0, 2, 1), nms["keep_topk"],
                                   nms["iou_threshold"], nms["score_threshold"])
    assert len(ref.selected_indices) > 0
    np.testing.assert_array_equal(got["selected_indices"], ref.selected_indices)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4,) with boxes b (K, 4), xyxy."""
    lt = np.maximum(a[:2], b[:, :2])
    rb = np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def assert_finds_confident_objects(found, reference, min_score: float = 0.5) -> None:
    """Every reference detection scoring >= min_score has a same-class detection in `found`
    with IoU >= 0.5."""
    for image, (f, r) in enumerate(zip(found, reference)):
        for box, score, label in zip(r.boxes, r.scores, r.labels):
            if score < min_score:
                continue
            same = f.labels == label
            assert same.any() and _iou(box, f.boxes[same]).max() >= 0.5, (image, label, score)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_decoded_files_give_detections(precision, fixture_model,
                                                         fixture_onnx, fixture_batch):
    result = fixture_onnx(variant="decoded", precision=precision)
    assert result.metadata["precision"] == precision
    backend = OnnxruntimeBackend(result.path, provider="cpu")
    assert backend.describe()["model"] == str(result.path)
    metas = fixture_batch.metas
    four = detections_from_outputs(fixture_model, backend.infer(fixture_batch.inputs), metas)
    one = detections_from_outputs(fixture_model, backend.infer(fixture_batch.inputs[:1]),
                                  metas[:1])
    assert backend.describe()["precision"] == precision
    fp32 = fixture_model.predict(fixture_batch)
    assert sum(len(r) for r in fp32) > 0 and all(len(d) > 0 for d in four)
    assert_finds_confident_objects(four, fp32)
    # batch 1 and batch 4 from one file find the same best detection
    assert one[0].labels[0] == four[0].labels[0]
    assert _iou(one[0].boxes[0], four[0].boxes[:1])[0] > 0.99


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_end2end_plugin_files_run(precision, fixture_model, fixture_onnx,
                                                    fixture_batch):
    """The TensorRT plugin stays fp32 outside the converted body and still runs."""
    result = fixture_onnx(variant="end2end", nms="efficient", precision=precision)
    backend = OnnxruntimeBackend(result.path, provider="cpu")
    four = backend.infer(fixture_batch.inputs)
    one = backend.infer(fixture_batch.inputs[:1])
    assert four["num_detections"].shape == (4, 1) and one["num_detections"].shape == (1, 1)
    assert (four["num_detections"] > 0).all()
    found = detections_from_outputs(fixture_model, four, fixture_batch.metas)
    assert_finds_confident_objects(found, fixture_model.predict(fixture_batch))
