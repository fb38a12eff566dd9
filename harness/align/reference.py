"""The PyTorch reference's detections are what mmyolo itself outputs (the head's
`predict_by_feat`, as `model.test_step` runs it); the numpy replay of the same pipeline only
explains them. This module links mmyolo's detections to the candidate rows the replay traced,
and says how far the replay's own output is from mmyolo's (only ties may separate them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from harness.align.ties import tie_dependent

# an mmyolo detection and a candidate are the same when their score is bit-equal and the
# candidate's box, rescaled and clamped as mmyolo does, is within this many pixels
SAME_BOX_PX = 1e-3
# relative score difference within which two softmax scores are the same (a few float32 ulp)
SAME_SOFTMAX = 1e-6


def candidate_rows(found: Any, side: Any, meta: Any) -> np.ndarray:
    """For each detection of `found` (NmsResult, boxes in original pixels), the candidate row
    of `side` (a pipelines.Replayed) with the same class and score whose box, rescaled and
    clamped as mmyolo does, is the detection's; -1 where no candidate is. Rows are not reused,
    so tied duplicates get distinct rows."""
    from harness.export.outputs import to_original_pixels

    rows = np.full(len(found), -1, np.int64)
    if not len(found):
        return rows
    if side.boxes.ndim == 3:
        return _per_class_rows(found, side)
    # the same float32 arithmetic as mmyolo's rescale and clamp: equal boxes are bit-equal
    original = to_original_pixels(side.boxes, meta)
    by_box: dict[bytes, list[int]] = {}
    for row, key in enumerate(map(np.ndarray.tobytes, original)):
        by_box.setdefault(key, []).append(row)
    taken: set[tuple[int, int]] = set()
    boxes = np.asarray(found.boxes, np.float32)
    for i, key in enumerate(map(np.ndarray.tobytes, boxes)):
        c, s = int(found.labels[i]), np.float32(found.scores[i])
        for row in by_box.get(key, ()):
            if side.scores[row, c] == s and (row, c) not in taken:
                rows[i] = row
                taken.add((row, c))
                break
    # a box a rounding step off: the nearest candidate of the same class and score
    for i in np.flatnonzero(rows < 0):
        c, s = int(found.labels[i]), np.float32(found.scores[i])
        cands = np.flatnonzero(side.scores[:, c] == s)
        if not cands.size:
            continue
        rows[i] = _nearest_free(cands, np.max(np.abs(original[cands] - boxes[i]), axis=1),
                                c, taken)
    return rows


def _nearest_free(cands: np.ndarray, dist: np.ndarray, c: int, taken: set) -> int:
    """The candidate row nearest by `dist` (within SAME_BOX_PX) whose (row, class) is not
    taken yet, marked taken; -1 when none is."""
    for k in np.argsort(dist, kind="stable"):
        if dist[k] > SAME_BOX_PX:
            break
        if (int(cands[k]), c) not in taken:
            taken.add((int(cands[k]), c))
            return int(cands[k])
    return -1


def _per_class_rows(found: Any, side: Any) -> np.ndarray:
    """candidate_rows for a box head with a box per class (side.boxes (N, C, 4), already in
    original pixels, as the two-stage NMS sees them): the row of the same class whose score
    is within SAME_SOFTMAX of it (torch's softmax and the replay's numpy one differ in the
    last bit) and whose box is within SAME_BOX_PX, nearest first."""
    rows = np.full(len(found), -1, np.int64)
    taken: set[tuple[int, int]] = set()
    boxes = np.asarray(found.boxes, np.float32)
    for i in range(len(found)):
        c, s = int(found.labels[i]), np.float32(found.scores[i])
        cands = np.flatnonzero(np.abs(side.scores[:, c] - s) <= SAME_SOFTMAX * max(s, 1e-30))
        if not cands.size:
            continue
        dist = np.max(np.abs(side.boxes[cands, c] - boxes[i]), axis=1) + \
            np.abs(side.scores[cands, c] - s)
        rows[i] = _nearest_free(cands, dist, c, taken)
    return rows


@dataclass
class ReplayCheck:
    """How mmyolo's own detections compare with the replay's, over all images: detections
    mmyolo output, those not found among the candidates, and those one has and the other lacks
    (split into tie-decided and not)."""

    detections: int = 0
    not_found: int = 0
    differ: int = 0
    differ_outside_ties: int = 0

    def to_json(self) -> dict[str, int]:
        return {"detections": self.detections, "not_found_in_candidates": self.not_found,
                "differ_from_replay": self.differ,
                "differ_outside_ties": self.differ_outside_ties}


def adopt_mmyolo_output(replays: Sequence[Any], found: Sequence[Any], metas: Sequence[Any],
                        check: ReplayCheck) -> None:
    """Make each replay's result mmyolo's own detections (`found`), linked to candidate rows,
    keeping the replay's trace for the explanations; count in `check` where they differ."""
    for side, out, meta in zip(replays, found, metas):
        replay = side.result
        out.box_index = candidate_rows(out, side, meta)
        out.trace = replay.trace
        mine = set(zip(out.box_index.tolist(), out.labels.tolist()))
        theirs = set(zip(replay.box_index.tolist(), replay.labels.tolist()))
        check.detections += len(out)
        check.not_found += int(np.count_nonzero(out.box_index < 0))
        differ = [p for p in (mine ^ theirs) if p[0] >= 0]
        check.differ += len(differ)
        if differ:
            b, c = np.asarray(differ).T
            check.differ_outside_ties += int(np.count_nonzero(~tie_dependent(side, b, c)))
        side.result = out
        side.output_pairs = mine
