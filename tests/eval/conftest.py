"""Fixtures of the COCO evaluation tests: the synthetic split (see split_data.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.eval.split_data import make_split


@pytest.fixture(scope="session")
def synth_val(tmp_path_factory) -> Path:
    """12 synthetic val images of seed 1 with annotations in COCO layout."""
    return make_split(tmp_path_factory.mktemp("coco_split"))
