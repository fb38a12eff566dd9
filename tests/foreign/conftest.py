"""Foreign ONNX files of the fixture detector, each exported once per test session into a
temporary folder: mmdeploy 1.3.1's (tests/foreign/mmdeploy_export.py) and easydeploy's
(tests/foreign/easydeploy_export.py). See tests/foreign/README.md."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest


@dataclass(frozen=True)
class ForeignFile:
    path: Path
    export_seconds: float


@pytest.fixture(scope="session")
def foreign_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("foreign_onnx")


@pytest.fixture(scope="session")
def mmdeploy_file(foreign_folder) -> Callable[[str], ForeignFile]:
    """mmdeploy_file(name) → the file of MMDEPLOY_RECIPES[name], exported on first use."""
    from tests.foreign.mmdeploy_export import (
        MMDEPLOY_INSTALL, MMDEPLOY_RECIPES, MMDEPLOY_VERSION, export_with_mmdeploy,
    )

    mmdeploy = pytest.importorskip(
        "mmdeploy", reason=f"mmdeploy is not installed: {MMDEPLOY_INSTALL}")
    assert mmdeploy.__version__ == MMDEPLOY_VERSION, \
        f"these fixtures record mmdeploy {MMDEPLOY_VERSION}'s files, found {mmdeploy.__version__}"
    made: dict[str, ForeignFile] = {}

    def export(name: str) -> ForeignFile:
        if name not in made:
            path = foreign_folder / f"{name}.onnx"
            seconds = export_with_mmdeploy(MMDEPLOY_RECIPES[name], path)
            made[name] = ForeignFile(path, seconds)
        return made[name]

    return export


@pytest.fixture(scope="session")
def easydeploy_file(foreign_folder) -> Callable[[str], ForeignFile]:
    """easydeploy_file(backend) → the fixture exported as easydeploy's export_onnx.py
    --backend <backend> does (default post-processing), on first use."""
    from tests.foreign.easydeploy_export import export_with_easydeploy

    made: dict[str, ForeignFile] = {}

    def export(backend: str) -> ForeignFile:
        if backend not in made:
            path = foreign_folder / f"easydeploy_{backend}.onnx"
            made[backend] = ForeignFile(path, export_with_easydeploy(backend, path))
        return made[backend]

    return export
