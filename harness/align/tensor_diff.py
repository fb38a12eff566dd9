"""Numeric distance between two tensors that should agree (one backend vs its reference);
the per-layer and per-output diffs are built from these."""
from __future__ import annotations

import numpy as np


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64; the plain norm of the difference when
    `expected` is all zeros (so two zero tensors give 0)."""
    diff = float(np.linalg.norm(actual.astype(np.float64) - expected.astype(np.float64)))
    scale = float(np.linalg.norm(expected.astype(np.float64)))
    return diff / scale if scale else diff
