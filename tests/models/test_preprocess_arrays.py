"""The preprocessing's array steps give exactly what the plain numpy formulas give: the
(C, H, W) input made from OpenCV's planes and normalised in place, and batches stacked into
a given array (a reader's shared-memory slot) with their padding — for odd sizes, either
channel order, with and without normalisation, mmdet's and ImageNet's mean / std."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from harness.data.preprocess import _normalized_chw, stack_inputs, stacked_shape
from harness.models.pipeline import PreprocessSpec


def plain_chw(img, spec):
    chw = np.ascontiguousarray(img.transpose(2, 0, 1))
    if spec.bgr_to_rgb:
        chw = chw[[2, 1, 0]]
    x = chw.astype(np.float32)
    if spec.normalize:
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
        x = (x - mean) / std
    return x


def plain_stack(inputs, spec):
    b, c, h, w = stacked_shape(inputs, spec)
    out = np.full((b, c, h, w), spec.pad_value, dtype=np.float32)
    for i, x in enumerate(inputs):
        out[i, :, : x.shape[1], : x.shape[2]] = x
    return out


SPECS = [
    PreprocessSpec(steps=(), mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0),
                   normalize=True, bgr_to_rgb=True),
    PreprocessSpec(steps=(), mean=(103.53, 116.28, 123.675), std=(57.375, 57.12, 58.395),
                   normalize=True, bgr_to_rgb=False, pad_size_divisor=32, pad_value=114.0),
    PreprocessSpec(steps=(), normalize=False, bgr_to_rgb=True, pad_size_divisor=32),
]


@pytest.mark.parametrize("spec", SPECS, ids=["yolo", "imagenet-mean-std", "raw"])
def test_the_input_is_the_plain_formulas_element_for_element(spec):
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 333), (320, 320), (481, 17), (640, 427)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[0, 0] = (0, 255, 128)
        fast = _normalized_chw(img, spec)
        assert fast.dtype == np.float32 and fast.flags.c_contiguous
        np.testing.assert_array_equal(fast, plain_chw(img, spec))
        # a view (what a letterbox crop or a resize may hand over) gives the same
        np.testing.assert_array_equal(_normalized_chw(img[:, ::-1], spec),
                                      plain_chw(np.ascontiguousarray(img[:, ::-1]), spec))


@pytest.mark.parametrize("spec", SPECS, ids=["yolo", "imagenet-mean-std", "raw"])
def test_a_batch_stacked_into_a_given_array_is_the_padded_batch(spec):
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((3, h, w)).astype(np.float32)
              for h, w in [(320, 213), (197, 320), (320, 320), (5, 9)]]
    expected = plain_stack(inputs, spec)
    np.testing.assert_array_equal(stack_inputs(inputs, spec), expected)
    slot = np.full(expected.shape, np.nan, dtype=np.float32)  # stale values: all overwritten
    assert stack_inputs(inputs, spec, out=slot) is slot
    np.testing.assert_array_equal(slot, expected)
    with pytest.raises(ValueError, match="not float32"):
        stack_inputs(inputs, spec, out=np.zeros((1, 3, 8, 8), np.float32))


def test_a_fixed_input_pads_to_it_and_refuses_a_larger_image():
    from harness.errors import UserError

    spec = replace(SPECS[0], pad_to=(320, 320))
    x = np.ones((3, 100, 300), np.float32)
    assert stack_inputs([x], spec).shape == (1, 3, 320, 320)
    with pytest.raises(UserError, match="does not fit the file's fixed input"):
        stack_inputs([np.ones((3, 330, 10), np.float32)], spec)
