"""The measurement store: a rerun reads back what was measured, a torn last line (a kill in
mid-write) is cut off, a store of another model / subset is set aside, not mixed in."""
from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.sensitivity.store import MeasurementStore

HEADER = {"conversion": {"fp32_sha256": "aa", "precision": "int8"},
          "subset": {"image_ids": [1, 2, 3]}}


def test_records_survive_a_reopen_and_a_torn_line(tmp_path):
    path = MeasurementStore.path_for(tmp_path, HEADER)
    store = MeasurementStore(path, HEADER).open()
    store.add("k1", {"label": "fp32", "AP": 0.5, "stats": {"AP": 0.5}})
    store.add("k2", {"label": "int8", "AP": 0.49, "stats": {"AP": 0.49}})
    with open(path, "ab") as f:  # killed while writing the third
        f.write(b'{"kind":"ap","key":"k3","AP":0.4')
    again = MeasurementStore(path, HEADER).open()
    assert set(again.records) == {"k1", "k2"} and again.get("k2")["AP"] == 0.49
    assert path.read_bytes().endswith(b"\n")  # the torn line is gone
    again.add("k3", {"AP": 0.47})
    assert MeasurementStore(path, HEADER).open().get("k3")["AP"] == 0.47


def test_another_subset_gets_its_own_file_and_a_changed_header_is_set_aside(tmp_path):
    other = {**HEADER, "subset": {"image_ids": [1, 2]}}
    assert MeasurementStore.path_for(tmp_path, other) != \
        MeasurementStore.path_for(tmp_path, HEADER)
    path = tmp_path / "ap.jsonl"
    MeasurementStore(path, HEADER).open().add("k1", {"AP": 0.5})
    with pytest.warns(UserWarning, match="moved it to ap.jsonl.stale"):
        fresh = MeasurementStore(path, other).open()
    assert fresh.records == {} and (tmp_path / "ap.jsonl.stale").is_file()


def test_a_damaged_line_is_one_line(tmp_path):
    path = tmp_path / "ap.jsonl"
    MeasurementStore(path, HEADER).open().add("k1", {"AP": 0.5})
    with open(path, "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(UserError, match="damaged at line 3"):
        MeasurementStore(path, HEADER).open()
