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


class DiffAccumulator:
    """max-abs, mean-abs, relative L2 and cosine of a target tensor against its reference,
    accumulated over batches in float64, so many images are compared without keeping their
    tensors: add() each batch, then summary()."""

    def __init__(self) -> None:
        self.count = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.sum_sq_diff = 0.0
        self.sum_sq_ref = 0.0
        self.sum_sq_target = 0.0
        self.dot = 0.0
        self.nonfinite = 0  # elements where either side is inf / NaN (left out of the rest)
        self.nonfinite_target = 0
        self.nonfinite_reference = 0

    def add(self, target: np.ndarray, reference: np.ndarray) -> None:
        t = np.asarray(target, np.float64).ravel()
        r = np.asarray(reference, np.float64).ravel()
        if t.shape != r.shape:
            raise ValueError(f"shapes differ: {target.shape} vs {reference.shape}")
        finite_t, finite_r = np.isfinite(t), np.isfinite(r)
        finite = finite_t & finite_r
        self.nonfinite += int(t.size - np.count_nonzero(finite))
        self.nonfinite_target += int(t.size - np.count_nonzero(finite_t))
        self.nonfinite_reference += int(r.size - np.count_nonzero(finite_r))
        t, r = t[finite], r[finite]
        d = t - r
        self.count += int(d.size)
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
        self.sum_abs += float(np.sum(np.abs(d)))
        self.sum_sq_diff += float(d @ d)
        self.sum_sq_ref += float(r @ r)
        self.sum_sq_target += float(t @ t)
        self.dot += float(t @ r)

    def summary(self) -> dict[str, float]:
        """max_abs, mean_abs, rel_l2 (the plain L2 of the difference when the reference is all
        zeros, as relative_l2), cosine (1 when both are all zeros) — all over the elements
        finite on both sides — and the non-finite counts: either side, target, reference."""
        norm_ref = np.sqrt(self.sum_sq_ref)
        diff = np.sqrt(self.sum_sq_diff)
        denom = np.sqrt(self.sum_sq_ref * self.sum_sq_target)
        if denom:
            cosine = self.dot / denom
        else:
            cosine = 1.0 if self.sum_sq_ref == self.sum_sq_target == 0 else 0.0
        return {"max_abs": self.max_abs,
                "mean_abs": self.sum_abs / self.count if self.count else 0.0,
                "rel_l2": float(diff / norm_ref) if norm_ref else float(diff),
                "cosine": float(cosine), "nonfinite": self.nonfinite,
                "nonfinite_target": self.nonfinite_target,
                "nonfinite_reference": self.nonfinite_reference}
