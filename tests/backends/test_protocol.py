"""The backend table: one protocol, one explicit dict, and no runtime imported before use."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from harness.backends import BACKENDS, Backend, input_sha256
from harness.data.preprocess import Batch


def test_backend_table():
    assert set(BACKENDS) == {"torch", "onnxruntime", "tensorrt"}
    for name, cls in BACKENDS.items():
        assert issubclass(cls, Backend) and cls.name == name


def test_importing_backends_imports_no_runtime():
    code = ("import sys, harness.backends, harness.export.onnx_export; "
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'mmyolo', 'tensorrt') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_input_hash_is_the_batch_hash():
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    assert input_sha256(x) == Batch(inputs=x).sha256
    y = x.copy()
    y[0, 0, 0, 0] += 1e-7
    assert input_sha256(y) != input_sha256(x)
