"""`harness build` where TensorRT cannot be imported: one line naming the install extra, exit 2;
bad options are reported before TensorRT is looked for."""
from __future__ import annotations

import sys

import pytest

from harness.cli import main


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_build_without_tensorrt_says_so_in_one_line(no_tensorrt, tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read before tensorrt is found")
    code = main(["build", str(onnx_file), "-o", str(tmp_path / "model.engine")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("harness build: error: TensorRT is not available: ")
    assert "install harness[tensorrt]" in err and "\n" not in err
    assert not (tmp_path / "model.engine").exists()


def test_build_checks_options_before_tensorrt(no_tensorrt, tmp_path, capsys):
    engine = str(tmp_path / "m.engine")
    assert main(["build", str(tmp_path / "missing.onnx"), "-o", engine]) == 2
    assert "ONNX file not found" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "missing.onnx"), "-o", engine,
                 "--min-batch", "4", "--max-batch", "2"]) == 2
    assert "min <= opt <= max" in capsys.readouterr().err


def test_backend_without_tensorrt_is_a_user_error(no_tensorrt, tmp_path):
    from harness.backends import BACKENDS
    from harness.errors import UserError

    backend = BACKENDS["tensorrt"](tmp_path / "model.engine")
    assert backend.describe() == {"backend": "tensorrt", "model": str(tmp_path / "model.engine")}
    with pytest.raises(UserError, match=r"TensorRT is not available: .*harness\[tensorrt\]"):
        backend.load()
