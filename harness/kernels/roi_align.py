"""RoIAlign in numpy: mmcv's op (what mmdet's Faster R-CNN RoI head runs) and ONNX RoiAlign as
onnxruntime runs it, in float32 with the kernels' own order of operations.

Both kernels descend from Detectron's Caffe2 RoIAlign and share everything but the conventions
below. Sources read: mmcv 2.0.1 ``mmcv/ops/csrc/pytorch/cpu/roi_align.cpp`` (``ROIAlignForward``,
shipped inside the installed mmcv package) and onnxruntime's
``onnxruntime/core/providers/cpu/object_detection/roialign.cc`` (``RoiAlignForward``; the stored
copy read predates opset 16, so what 1.32.0 does with ``half_pixel`` and empty bins was settled by
experiment); the ONNX spec's reference implementation ``onnx/reference/ops/op_roi_align.py``. The
order of float32 operations is the kernels' own: on the tests' 1,700-odd random cases the results
agree bit for bit with both.

The per-RoI geometry, on the feature map (``s`` = spatial_scale)::

    start = x1 * s - offset        end = x2 * s - offset        size = end - start
    bin = size / out               samples per bin per axis g = sampling_ratio, or ceil(size / out)
    sample (p, i) = start + p * bin + (i + .5) * bin / g          p < out, i < g

Coordinate conventions:

* **half-pixel** -- mmcv ``aligned=True`` (mmdet's default), ONNX opset 16
  ``coordinate_transformation_mode='half_pixel'`` (its default): ``offset = 0.5``, the RoI size is
  not clamped, so a zero-size RoI samples points and, with ``sampling_ratio=0``, has
  ``g = ceil(0) = 0``: an empty bin. A negative size is an error in mmcv (``AT_ASSERTM``); this
  kernel raises ``ValueError`` there too.
* **output-half-pixel** -- mmcv ``aligned=False`` (the legacy Detectron behaviour), ONNX opset 10
  RoiAlign (it has no ``coordinate_transformation_mode``, and behaves as this one) and opset 16
  ``'output_half_pixel'``: ``offset = 0`` and the size is clamped to at least 1 feature pixel.

Bilinear sampling (identical in both): a sample with ``y < -1`` or ``y > H`` (or the same in x)
contributes exactly 0; otherwise a coordinate ``<= 0`` becomes 0, and from the last row/column on
both neighbours are the last row/column.

Pooling inside a bin (``count = max(g_h * g_w, 1)``: an empty bin averages to 0 in both):

* ``"avg"`` (both): sum of the samples' bilinear values, in sample order, divided by ``count``.
* ``"max"`` -- mmcv: the max over samples of the bilinear value ``w1*v1 + w2*v2 + w3*v3 + w4*v4``,
  starting from ``-10000`` (``T maxval = -10000``): an empty bin gives -10000, and so does a bin
  whose every sample is below -10000.
* ``"max_onnxruntime"`` -- ONNX ``mode='max'`` as onnxruntime's CPU kernel (and the ONNX reference
  implementation) compute it: per sample the max of the four *individually weighted corners*
  ``max(w1*v1, w2*v2, w3*v3, w4*v4)`` -- never the interpolated value -- then the max over samples;
  an empty bin gives 0. A sample at the centre of four pixels thus yields about a quarter of a
  pixel value. Known and still the default: microsoft/onnxruntime#6146 ("Dubious implementation of
  ROIAlign in 'max' mode"), #12136 (the warning 1.32.0 still prints for every max-mode node with
  ``sampling_ratio != 1``: "The existing summation for max mode and sampling ratios besides 1 is
  incorrect and will be fixed in the next ORT 1.13 release"), onnx/onnx#4764 (the mmcv
  difference); the open PR microsoft/onnxruntime#27554 would add an opt-in
  ``ORT_ROIALIGN_MAX_USE_BILINEAR_INTERPOLATION=1``. Checked by experiment on onnxruntime 1.32.0
  (CPU): a 5x5 map holding 1..25, one sample at (1.5, 1.5): onnxruntime's max gives 3.25 (= 13/4),
  mmcv's 10 (= (7+8+12+13)/4), with or without that variable set.

Deployment notes: mmcv exports ``aligned=True`` as an opset-10 RoiAlign on RoIs shifted by
``0.5 / spatial_scale`` (``RoIAlignFunction.symbolic``), which equals half-pixel except that the
size clamp still applies (RoIs under one feature pixel); a ``pool_mode='max'`` layer exported to
ONNX changes meaning. onnxruntime fails (integer overflow) on a half-pixel RoI with
``sampling_ratio=0`` whose grid is negative along exactly one axis; ``roi_align_onnx`` raises
``ValueError`` there.
"""
from __future__ import annotations

import numpy as np

MODES = ("avg", "max", "max_onnxruntime")
MMCV_MAX_START = np.float32(-10000.0)  # mmcv's `T maxval = -10000`
_F = np.float32


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned, mode="avg"):
    """mmcv's ``roi_align`` (CPU kernel): ``features`` (B, C, H, W), ``rois`` (K, 5) rows
    ``(batch_index, x1, y1, x2, y2)`` in input-image pixels. ``aligned=True`` is the half-pixel
    convention, ``False`` output-half-pixel; ``mode`` one of ``MODES`` ("max" is mmcv's, see the
    module docstring). Returns float32 (K, C, out_h, out_w)."""
    rois = np.asarray(rois, dtype=_F)
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (K, 5) rows (batch_index, x1, y1, x2, y2): {rois.shape}")
    out_h, out_w = (output_size, output_size) if np.isscalar(output_size) else output_size
    batch = rois[:, 0].astype(np.int64)  # mmcv: `int roi_batch_ind = offset_rois[0]`
    if aligned:
        _, _, size_w, size_h = _geometry(rois[:, 1:], _F(spatial_scale), half_pixel=True)
        if np.any(size_w < 0) or np.any(size_h < 0):
            raise ValueError("aligned RoIAlign needs x2 >= x1 and y2 >= y1 (mmcv asserts it)")
    return _roi_align(features, batch, rois[:, 1:], int(out_h), int(out_w), spatial_scale,
                      sampling_ratio, bool(aligned), mode)


def roi_align_onnx(X, rois, batch_indices, output_height=1, output_width=1, sampling_ratio=0,
                   spatial_scale=1.0, mode="avg", coordinate_transformation_mode="half_pixel"):
    """ONNX RoiAlign as onnxruntime's CPU kernel computes it: ``rois`` (K, 4) ``(x1, y1, x2, y2)``
    and ``batch_indices`` (K,) apart; defaults are the spec's (opset 16). An opset-10 node has no
    ``coordinate_transformation_mode`` and behaves as ``'output_half_pixel'``: pass that for it.
    ``mode='max'`` is the ONNX/onnxruntime weighted-corner max (``"max_onnxruntime"``)."""
    if mode not in ("avg", "max"):
        raise ValueError(f"ONNX RoiAlign mode is 'avg' or 'max', got {mode!r}")
    if coordinate_transformation_mode not in ("half_pixel", "output_half_pixel"):
        raise ValueError("coordinate_transformation_mode is 'half_pixel' or 'output_half_pixel', "
                         f"got {coordinate_transformation_mode!r}")
    rois = np.asarray(rois, dtype=_F)
    if rois.ndim != 2 or rois.shape[1] != 4:
        raise ValueError(f"rois must be (K, 4) rows (x1, y1, x2, y2), got {rois.shape}")
    half_pixel = coordinate_transformation_mode == "half_pixel"
    if half_pixel and sampling_ratio <= 0:
        _, _, size_w, size_h = _geometry(rois, _F(spatial_scale), half_pixel=True)
        grid_w, grid_h = _grid(size_w, output_width, 0), _grid(size_h, output_height, 0)
        if np.any((grid_w < 0) != (grid_h < 0)):
            raise ValueError("a RoI with a negative sample grid along one axis only: onnxruntime "
                             "fails on it (integer overflow)")
    return _roi_align(X, np.asarray(batch_indices, dtype=np.int64), rois, int(output_height),
                      int(output_width), spatial_scale, sampling_ratio, half_pixel,
                      "max_onnxruntime" if mode == "max" else "avg")


def _geometry(boxes, scale, half_pixel):
    """Start and size of each RoI on the feature map, float32 as the kernels compute them: the
    half-pixel convention subtracts 0.5 and keeps the size, the other clamps the size to >= 1."""
    offset = _F(0.5) if half_pixel else _F(0.0)
    start_w, start_h = boxes[:, 0] * scale - offset, boxes[:, 1] * scale - offset
    size_w = (boxes[:, 2] * scale - offset) - start_w
    size_h = (boxes[:, 3] * scale - offset) - start_h
    if not half_pixel:
        size_w, size_h = np.maximum(size_w, _F(1)), np.maximum(size_h, _F(1))
    return start_w, start_h, size_w, size_h


def _grid(size, pooled, sampling_ratio):
    """Samples per bin along one axis: the fixed ratio, or adaptive ``ceil(size / pooled)``."""
    if sampling_ratio > 0:
        return np.full(size.shape, int(sampling_ratio), dtype=np.int64)
    return np.ceil(size / _F(pooled)).astype(np.int64)


def _axis(start, bin_size, pooled, grid, length):
    """One axis's sample coordinates (pooled, grid) and their bilinear neighbours/weights, with the
    boundary rules of the module docstring; ``inside`` is False for samples that contribute 0."""
    p = np.arange(pooled, dtype=_F)[:, None]
    i = np.arange(grid, dtype=_F)[None, :] + _F(0.5)
    coord = (start + p * bin_size) + (i * bin_size) / _F(grid)
    inside = (coord >= -1) & (coord <= length)
    coord = np.clip(coord, _F(0), _F(length))  # the upper clip only touches samples not inside
    low = coord.astype(np.int64)
    last = low >= length - 1
    low = np.where(last, length - 1, low)
    high = np.where(last, length - 1, low + 1)
    frac = np.where(last, _F(0), coord - low.astype(_F))
    return low, high, frac, _F(1) - frac, inside


def _roi_align(features, batch, boxes, out_h, out_w, spatial_scale, sampling_ratio, half_pixel,
               mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    features = np.asarray(features, dtype=_F)
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, H, W), got {features.shape}")
    n_batch, channels, height, width = features.shape
    if len(batch) != len(boxes):
        raise ValueError(f"{len(batch)} batch indices for {len(boxes)} RoIs")
    if len(batch) and (batch.min() < 0 or batch.max() >= n_batch):
        raise ValueError(f"batch index out of range for a batch of {n_batch}")
    start_w, start_h, size_w, size_h = _geometry(boxes, _F(spatial_scale), half_pixel)
    bin_w, bin_h = size_w / _F(out_w), size_h / _F(out_h)
    grid_w = np.maximum(_grid(size_w, out_w, sampling_ratio), 0)
    grid_h = np.maximum(_grid(size_h, out_h, sampling_ratio), 0)
    empty = MMCV_MAX_START if mode == "max" else _F(0)
    out = np.empty((len(boxes), channels, out_h, out_w), dtype=_F)
    for k in range(len(boxes)):
        gh, gw = int(grid_h[k]), int(grid_w[k])
        if gh == 0 or gw == 0:
            out[k] = empty
            continue
        y_low, y_high, ly, hy, y_in = _axis(start_h[k], bin_h[k], out_h, gh, height)
        x_low, x_high, lx, hx, x_in = _axis(start_w[k], bin_w[k], out_w, gw, width)
        # every array below is (out_h, gh, out_w, gw), or (C, out_h, gh, out_w, gw) with values
        inside = y_in[:, :, None, None] & x_in[None, None]
        wy = {"low": hy[:, :, None, None], "high": ly[:, :, None, None]}
        wx = {"low": hx[None, None], "high": lx[None, None]}
        iy = {"low": y_low[:, :, None, None], "high": y_high[:, :, None, None]}
        ix = {"low": x_low[None, None], "high": x_high[None, None]}
        fmap = features[batch[k]]
        corners = [np.where(inside, wy[a] * wx[b], _F(0)) * fmap[:, iy[a], ix[b]]
                   for a, b in (("low", "low"), ("low", "high"), ("high", "low"), ("high", "high"))]
        if mode == "max_onnxruntime":
            per_sample = np.maximum(np.maximum(np.maximum(corners[0], corners[1]), corners[2]),
                                    corners[3])
        else:
            per_sample = ((corners[0] + corners[1]) + corners[2]) + corners[3]
        samples = per_sample.transpose(0, 1, 3, 2, 4).reshape(channels, out_h, out_w, gh * gw)
        if mode == "avg":  # cumsum adds in sample order, as the C++ loop does
            out[k] = samples.cumsum(axis=-1, dtype=_F)[..., -1] / _F(gh * gw)
        elif mode == "max":
            out[k] = np.maximum(samples.max(axis=-1), MMCV_MAX_START)
        else:
            out[k] = samples.max(axis=-1)
    return out
