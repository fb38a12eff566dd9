"""The numpy RoIAlign (harness.kernels.roi_align) == mmcv's roi_align and onnxruntime's RoiAlign,
both on CPU, on random cases built to hit every convention and edge (boxes on and past the border,
under one pixel, of zero width, covering or exceeding the image, reversed where allowed, corners
snapped so that samples land exactly on the boundary rules), plus the max-mode semantics that
differ between the two and what the opset-10 convention costs an aligned model."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from harness.kernels.roi_align import MMCV_MAX_START, roi_align, roi_align_onnx

TOL = 1e-5
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
OUTPUT_SIZES = ((7, 7), (7, 7), (2, 3), (1, 1))
MMCV_CASES_PER_SETTING = 64  # x 8 settings = 512 cases
ORT_CASES_PER_SETTING = 100  # x 12 settings = 1200 cases
KINDS = ("inside", "border", "outside", "tiny", "tiny_feature", "zero", "whole", "large")
KIND_P = (0.3, 0.2, 0.04, 0.1, 0.1, 0.08, 0.06, 0.12)  # most RoIs see some of the map


def _interval(rng, kind: str, length: float, stride: float, reversed_ok: bool):
    """(lo, hi) along one axis of an image `length` pixels long."""
    if kind == "inside":
        lo = rng.uniform(0, length)
        hi = rng.uniform(lo, length)
    elif kind == "border":  # straddles an edge, or ends past it
        lo = rng.uniform(-length / 2, length)
        hi = lo + rng.uniform(0, length)
    elif kind == "outside":
        before, after = rng.uniform(-3 * stride, -stride / 2), rng.uniform(0, 3 * stride) + length
        lo = before if rng.random() < 0.5 else after
        hi = lo + rng.uniform(0, 2 * stride)
    elif kind == "tiny":  # under one input pixel
        lo = rng.uniform(-stride, length + stride)
        hi = lo + rng.uniform(0, 1)
    elif kind == "tiny_feature":  # under one feature pixel
        lo = rng.uniform(-stride, length + stride)
        hi = lo + rng.uniform(0, stride)
    elif kind == "zero":
        lo = hi = rng.uniform(-stride, length + stride)
    elif kind == "whole":
        lo, hi = 0.0, length
    else:  # large: past both edges
        lo, hi = rng.uniform(-length, 0), rng.uniform(length, 2 * length)
    if kind != "tiny" and rng.random() < 0.5:  # quarter feature pixels: samples hit -1, 0,
        # H-1 and H exactly
        lo, hi = (np.round(v * 4 / stride) * stride / 4 for v in (lo, hi))
    if reversed_ok and rng.random() < 0.1:
        lo, hi = hi, lo - rng.uniform(0, 2 * stride)
    return lo, hi


def _random_case(rng, reversed_ok: bool):
    """Features (2, C, H, W), H and W from 3 to 21, and RoIs (K, 5) in input-image pixels (the
    image being the feature map times the stride)."""
    scale = float(rng.choice(SCALES))
    stride = 1 / scale
    h, w = (13, 17) if rng.random() < 0.25 else (int(v) for v in rng.integers(3, 22, 2))
    feats = rng.standard_normal((2, int(rng.integers(1, 5)), h, w)).astype(np.float32)
    rows = []
    for _ in range(int(rng.integers(4, 12))):
        kx, ky = rng.choice(KINDS, 2, p=KIND_P)
        if "whole" in (kx, ky):
            kx = ky = "whole"
        x1, x2 = _interval(rng, kx, w * stride, stride, reversed_ok)
        y1, y2 = _interval(rng, ky, h * stride, stride, reversed_ok)
        rows.append((rng.integers(0, 2), x1, y1, x2, y2))
    out_size = OUTPUT_SIZES[int(rng.integers(len(OUTPUT_SIZES)))]
    return feats, np.array(rows, dtype=np.float32), scale, out_size


def _mmcv(feats, rois, out_size, scale, sampling_ratio, mode, aligned):
    import torch
    from mmcv.ops import roi_align as mmcv_roi_align

    with torch.no_grad():
        out = mmcv_roi_align(torch.from_numpy(feats), torch.from_numpy(rois), out_size, scale,
                             sampling_ratio, mode, aligned)
    return out.numpy()


@functools.lru_cache(maxsize=None)
def _ort_session(opset, ctm, mode, sampling_ratio, scale, out_h, out_w):
    """A one-node RoiAlign model run by onnxruntime on CPU; opset 10 has no
    coordinate_transformation_mode (pass ctm=None)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    attrs = dict(output_height=out_h, output_width=out_w, sampling_ratio=sampling_ratio,
                 spatial_scale=scale, mode=mode)
    if ctm is not None:
        attrs["coordinate_transformation_mode"] = ctm
    node = helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], **attrs)
    graph = helper.make_graph(
        [node], "roi_align",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "C", "H", "W"]),
         helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["K", 4]),
         helper.make_tensor_value_info("batch_indices", TensorProto.INT64, ["K"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["K", "C", out_h, out_w])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    ort.set_default_logger_severity(3)  # max mode warns at every session (onnxruntime#12136)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _ort(opset, ctm, mode, sampling_ratio, scale, out_size, feats, rois, batch_indices):
    sess = _ort_session(opset, ctm, mode, sampling_ratio, scale, *out_size)
    return sess.run(None, {"X": feats, "rois": rois, "batch_indices": batch_indices})[0]


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_mmcv(aligned, sampling_ratio, mode):
    rng = np.random.default_rng(1000 + 4 * aligned + 2 * (sampling_ratio > 0) + (mode == "max"))
    worst = 0.0
    for _ in range(MMCV_CASES_PER_SETTING):
        feats, rois, scale, out_size = _random_case(rng, reversed_ok=not aligned)
        ours = roi_align(feats, rois, out_size, scale, sampling_ratio, aligned, mode)
        theirs = _mmcv(feats, rois, out_size, scale, sampling_ratio, mode, aligned)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= TOL


ORT_CONVENTIONS = [(10, None), (16, "half_pixel"), (16, "output_half_pixel")]


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("opset,ctm", ORT_CONVENTIONS)
def test_matches_onnxruntime(opset, ctm, sampling_ratio, mode):
    rng = np.random.default_rng(2000 + 10 * opset + 4 * (ctm == "half_pixel")
                                + 2 * (sampling_ratio > 0) + (mode == "max"))
    convention = ctm or "output_half_pixel"  # what an opset-10 RoiAlign does
    worst = 0.0
    for _ in range(ORT_CASES_PER_SETTING):
        # reversed RoIs only where the size is clamped: onnxruntime can fail on them otherwise
        feats, rois, scale, out_size = _random_case(rng, reversed_ok=convention != "half_pixel")
        boxes, batch_indices = rois[:, 1:].copy(), rois[:, 0].astype(np.int64)
        ours = roi_align_onnx(feats, boxes, batch_indices, *out_size, sampling_ratio, scale, mode,
                              convention)
        theirs = _ort(opset, ctm, mode, sampling_ratio, scale, out_size, feats, boxes,
                      batch_indices)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= TOL


def test_max_mode_semantics_differ():
    """One sample (sampling_ratio=1) at the centre of pixels 7, 8, 12, 13 of a 5x5 map of 1..25:
    mmcv's max pools the interpolated value (10), onnxruntime's the largest weighted corner
    (13/4). mmcv's max never goes below -10000, its starting value, so an empty bin (zero-size
    aligned RoI, adaptive sampling) is -10000 there, 0 in onnxruntime's."""
    feats = np.arange(1, 26, dtype=np.float32).reshape(1, 1, 5, 5)
    centre = np.array([[0, 1, 1, 2, 2]], dtype=np.float32)  # output-half-pixel: sample at 1.5
    assert roi_align(feats, centre, 1, 1.0, 1, False, "max").item() == 10.0
    assert _mmcv(feats, centre, (1, 1), 1.0, 1, "max", False).item() == 10.0
    assert roi_align(feats, centre, 1, 1.0, 1, False, "max_onnxruntime").item() == 3.25
    assert roi_align_onnx(feats, centre[:, 1:], [0], 1, 1, 1, 1.0, "max",
                          "output_half_pixel").item() == 3.25
    batch = np.zeros(1, np.int64)
    assert _ort(10, None, "max", 1, 1.0, (1, 1), feats, centre[:, 1:], batch).item() == 3.25

    deep = feats - np.float32(1e5)  # mmcv's max starts at -10000 and never goes below
    assert roi_align(deep, centre, 1, 1.0, 1, False, "max").item() == -10000
    assert _mmcv(deep, centre, (1, 1), 1.0, 1, "max", False).item() == -10000
    assert roi_align(deep, centre, 1, 1.0, 1, False, "avg").item() == 10.0 - 1e5

    point = np.array([[0, 2, 2, 2, 3]], dtype=np.float32)  # zero width: no sample along x
    assert roi_align(feats, point, 1, 1.0, 0, True, "max").item() == MMCV_MAX_START == -10000
    assert _mmcv(feats, point, (1, 1), 1.0, 0, "max", True).item() == -10000
    assert roi_align(feats, point, 1, 1.0, 0, True, "avg").item() == 0.0
    assert _mmcv(feats, point, (1, 1), 1.0, 0, "avg", True).item() == 0.0
    for mode in ("max", "avg"):
        assert roi_align_onnx(feats, point[:, 1:], [0], 1, 1, 0, 1.0, mode).item() == 0.0
        ort = _ort(16, "half_pixel", mode, 0, 1.0, (1, 1), feats, point[:, 1:], batch)
        assert ort.item() == 0.0


def test_boundary_samples():
    """Single samples (output-half-pixel, 1x1 RoI, sampling_ratio=1: the sample sits at x1 + 0.5)
    exactly at -1 and at W (still in: row/column 0 and the last), just beyond them (0), and at
    -0.5 and W - 0.5 (clamped to the edge)."""
    feats = np.arange(1, 13, dtype=np.float32).reshape(1, 1, 3, 4)
    y = 1.0  # the sample's row is 1.5: halfway between rows 1 (5..8) and 2 (9..12)
    xs = np.array([-1.5, -1.5 - 2 ** -10, 3.5, 3.5 + 2 ** -10, -1.0, 3.0], dtype=np.float32)
    rois = np.stack([np.zeros(6), xs, np.full(6, y), xs + 1, np.full(6, y + 1)], 1)
    rois = rois.astype(np.float32)
    expected = np.array([7.0, 0.0, 10.0, 0.0, 7.0, 10.0], dtype=np.float32)  # rows 1 and 2 averaged
    for mode in ("avg", "max"):
        ours = roi_align(feats, rois, 1, 1.0, 1, False, mode).ravel()
        assert np.array_equal(ours, expected)
        assert np.array_equal(_mmcv(feats, rois, (1, 1), 1.0, 1, mode, False).ravel(), expected)
    ort = _ort(10, None, "avg", 1, 1.0, (1, 1), feats, rois[:, 1:], np.zeros(6, np.int64)).ravel()
    assert np.array_equal(roi_align_onnx(feats, rois[:, 1:], np.zeros(6), 1, 1, 1, 1.0, "avg",
                                         "output_half_pixel").ravel(), ort)
    assert np.array_equal(ort, expected)


def test_negative_size():
    """mmcv refuses a reversed aligned RoI and so does the kernel; a reversed half-pixel RoI with
    adaptive sampling is empty (0) in onnxruntime when both axes are reversed beyond one bin, and
    fails there when one only is."""
    import torch

    feats = np.arange(1, 26, dtype=np.float32).reshape(1, 1, 5, 5)
    reversed_roi = np.array([[0, 3, 1, 1, 2]], dtype=np.float32)
    with pytest.raises(ValueError):
        roi_align(feats, reversed_roi, 1, 1.0, 0, True)
    with pytest.raises(RuntimeError):
        from mmcv.ops import roi_align as mmcv_roi_align

        mmcv_roi_align(torch.from_numpy(feats), torch.from_numpy(reversed_roi), 1, 1.0, 0, "avg",
                       True)
    both = np.array([[5, 5, 1, 1]], dtype=np.float32)
    one = np.array([[1, 1, 5, -3]], dtype=np.float32)
    batch = np.zeros(1, np.int64)
    assert roi_align_onnx(feats, both, batch, 1, 1, 0, 1.0, "avg").item() == 0.0
    assert _ort(16, "half_pixel", "avg", 0, 1.0, (1, 1), feats, both, batch).item() == 0.0
    with pytest.raises(ValueError):
        roi_align_onnx(feats, one, batch, 1, 1, 0, 1.0, "avg")
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    with pytest.raises(Fail):
        _ort(16, "half_pixel", "avg", 0, 1.0, (1, 1), feats, one, batch)
    # with a fixed sampling ratio the reversed RoI samples backwards, in both
    ours = roi_align_onnx(feats, both, batch, 1, 1, 2, 1.0, "avg")
    assert ours.item() == _ort(16, "half_pixel", "avg", 2, 1.0, (1, 1), feats, both, batch).item()


def test_opset10_cost_for_aligned_model():
    """An mmdet Faster R-CNN RoI head (7x7, sampling_ratio=0, aligned=True) on the stride-8 FPN
    level of a 1344x800 input, with smooth features and proposals of that level's sizes (sqrt area
    112..224 px): the opset-10 RoiAlign taken as is (output-half-pixel, no offset) is half a feature
    pixel off; mmcv's own export (opset 10 on RoIs shifted by 0.5 / spatial_scale) is not, except
    on RoIs under one feature pixel, where the size clamp still bites."""
    import cv2

    rng = np.random.default_rng(7)
    scale, (h, w) = 1 / 8, (100, 168)
    noise = rng.standard_normal((16, h, w)).astype(np.float32)
    feats = np.stack([cv2.GaussianBlur(c, (0, 0), 2.0) for c in noise])[None]
    feats /= feats.std()
    side = rng.uniform(112, 224, 200)
    aspect = rng.uniform(0.5, 2.0, 200)
    bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
    x1, y1 = rng.uniform(0, w / scale - bw), rng.uniform(0, h / scale - bh)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1).astype(np.float32)
    batch = np.zeros(len(boxes), np.int64)
    rois = np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes], 1)

    ref = roi_align(feats, rois, 7, scale, 0, True)
    naive = roi_align_onnx(feats, boxes, batch, 7, 7, 0, scale, "avg", "output_half_pixel")
    max_abs = float(np.abs(naive - ref).max())
    rel = max_abs / float(np.abs(ref).max())
    mean_rel = float(np.abs(naive - ref).mean() / np.abs(ref).mean())
    # measured: max |diff| 0.93 (0.23 of max |output| 4.11), mean |diff| 0.23 of mean |output|
    assert max_abs > 0.5 and rel > 0.1 and mean_rel > 0.1, (max_abs, rel, mean_rel)

    shifted = roi_align_onnx(feats, boxes - np.float32(0.5 / scale), batch, 7, 7, 0, scale,
                             "avg", "output_half_pixel")
    assert float(np.abs(shifted - ref).max()) <= 1e-4  # measured: 0
    tiny = np.array([[0, 400, 300, 404, 303]], dtype=np.float32)  # half a feature pixel wide
    tiny_shifted = roi_align_onnx(feats, tiny[:, 1:] - np.float32(0.5 / scale), [0], 7, 7, 0,
                                  scale, "avg", "output_half_pixel")
    tiny_err = float(np.abs(tiny_shifted - roi_align(feats, tiny, 7, scale, 0, True)).max())
    assert tiny_err > 0.1, tiny_err  # measured: 0.64 (max |output| 1.51)


@pytest.mark.parametrize("aligned", [True, False])
def test_tensorrt_plugin_node_gives_onnx_roialign_numbers(aligned):
    """TRT::ROIAlign_TRT (int attributes: coordinate_transformation_mode 1 = half-pixel, mode
    1 = avg) computed by harness.kernels.roi_align_plugin equals onnxruntime's RoiAlign of the
    same convention; a node with an out-of-range mode is one line."""
    from onnx import helper

    from harness.errors import UserError
    from harness.nms.plugin_nodes import PLUGIN_KERNELS

    rng = np.random.default_rng(7 + aligned)
    ctm = "half_pixel" if aligned else "output_half_pixel"
    kernel = PLUGIN_KERNELS[("TRT", "ROIAlign_TRT")]
    worst = 0.0
    for _ in range(20):
        feats, rois, scale, (out_h, out_w) = _random_case(rng, reversed_ok=not aligned)
        boxes, batch = rois[:, 1:].copy(), rois[:, 0].astype(np.int32)
        node = helper.make_node("ROIAlign_TRT", ["x", "r", "b"], ["y"], domain="TRT",
                                coordinate_transformation_mode=int(aligned), mode=1,
                                output_height=out_h, output_width=out_w, sampling_ratio=0,
                                spatial_scale=scale)
        (ours,), trace = kernel(node, [feats, boxes, batch])
        theirs = _ort(16, ctm, "avg", 0, scale, (out_h, out_w), feats, boxes,
                      batch.astype(np.int64))
        assert trace is None and ours.shape == theirs.shape
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= TOL
    bad = helper.make_node("ROIAlign_TRT", ["x", "r", "b"], ["y"], domain="TRT", mode=2)
    with pytest.raises(UserError, match="mode and coordinate_transformation_mode"):
        kernel(bad, [feats, boxes, batch])
