"""relative_l2: the distance every backend comparison uses."""
from __future__ import annotations

import numpy as np

from harness.align.tensor_diff import relative_l2


def test_relative_l2_scales_by_the_reference():
    ref = np.array([3.0, 4.0], np.float32)  # norm 5
    assert abs(relative_l2(ref + np.array([0.3, 0.4], np.float32), ref) - 0.1) < 1e-7


def test_relative_l2_of_zero_reference_is_the_plain_norm():
    zero = np.zeros(4, np.float32)
    assert relative_l2(zero, zero) == 0.0
    assert relative_l2(np.full(4, 0.5, np.float32), zero) == 1.0
