"""What the NMS tests share: the skip for packages a CPU machine may lack, and the trace
invariants every kernel's trace must satisfy."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from harness.nms.trace import UNSET, FateKind, NmsResult


def need(module: str, install: str):
    """Import `module` or skip the test, saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"needs {module} ({exc}); install: {install}")


def assert_trace_consistent(result: NmsResult) -> None:
    """Every candidate has exactly one fate, counts add up to N * C, and the kept fates are the
    output rows, in output order."""
    tr = result.trace
    assert tr is not None
    assert not np.any(tr.code == UNSET)
    assert set(np.unique(tr.code)) <= {int(k) for k in FateKind}
    counts = tr.counts()
    assert "unset" not in counts
    assert sum(counts.values()) == tr.num_boxes * tr.num_classes
    box, cls = tr.kept()
    np.testing.assert_array_equal(box, result.box_index)
    np.testing.assert_array_equal(cls, result.labels)
    assert counts["kept"] == len(result)
    # n/a fields stay n/a: suppressors only on suppressed candidates, limits only on cuts
    suppressed = tr.code == FateKind.SUPPRESSED
    assert np.all((tr.by_box >= 0) == suppressed)
    cut = (tr.code == FateKind.CUT_PRE_NMS_TOPK) | (tr.code == FateKind.CUT_MAX_DETECTIONS)
    assert np.all((tr.limit != -1) == cut)
