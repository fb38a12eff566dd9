"""The engine sidecar: written and read back; another TensorRT, another GPU, a changed ONNX,
or a missing / corrupt sidecar each refused in one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.backends.tensorrt_sidecar import (EngineSidecar, check_sidecar, read_sidecar,
                                               sidecar_path, write_sidecar)
from harness.errors import UserError
from harness.export.metadata import file_sha256


@pytest.fixture
def built(tmp_path: Path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"onnx bytes")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    sidecar = EngineSidecar(
        tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0", precision="fp16",
        profile={"min": [1, 3, 320, 320], "opt": [4, 3, 320, 320], "max": [4, 3, 320, 320]},
        inputs={"images": [-1, 3, 320, 320]}, outputs={"num_dets": [-1, 1]},
        onnx_path=str(onnx_file), onnx_sha256=file_sha256(onnx_file),
        export={"variant": "end2end", "precision": "fp32"})
    write_sidecar(engine, sidecar)
    return engine, onnx_file, sidecar


HERE = ("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_written_next_to_engine_and_read_back(built):
    engine, onnx_file, sidecar = built
    assert sidecar_path(engine) == engine.with_name("model.engine.json")
    assert read_sidecar(engine) == sidecar
    check_sidecar(read_sidecar(engine), *HERE, onnx_path=onnx_file)


def test_other_tensorrt_version_refused(built):
    engine, _, _ = built
    with pytest.raises(UserError, match="built with TensorRT 10.13.0.35, this is TensorRT "
                                        "10.14.1") as exc:
        check_sidecar(read_sidecar(engine), "10.14.1", *HERE[1:])
    one_line(exc)


@pytest.mark.parametrize("gpu, cc", [("NVIDIA A100-SXM4-80GB", "8.0"),
                                     ("NVIDIA H100 80GB HBM3", "9.1")])
def test_other_gpu_refused(built, gpu, cc):
    engine, _, _ = built
    with pytest.raises(UserError, match="built for NVIDIA H100") as exc:
        check_sidecar(read_sidecar(engine), HERE[0], gpu, cc)
    one_line(exc)


def test_changed_onnx_refused(built):
    engine, onnx_file, _ = built
    onnx_file.write_bytes(b"re-exported")
    with pytest.raises(UserError, match="has changed since the engine was built") as exc:
        check_sidecar(read_sidecar(engine), *HERE, onnx_path=onnx_file)
    one_line(exc)
    onnx_file.unlink()
    with pytest.raises(UserError, match="not found"):
        check_sidecar(read_sidecar(engine), *HERE, onnx_path=onnx_file)


def test_missing_or_corrupt_sidecar_refused(built):
    engine, _, _ = built
    path = sidecar_path(engine)
    path.write_text("{not json")
    with pytest.raises(UserError, match="is corrupt") as exc:
        read_sidecar(engine)
    one_line(exc)
    path.write_text('{"tensorrt_version": "10.0"}')  # fields missing
    with pytest.raises(UserError, match="is corrupt"):
        read_sidecar(engine)
    path.unlink()
    with pytest.raises(UserError, match="is missing") as exc:
        read_sidecar(engine)
    one_line(exc)


def test_debug_engine_names_come_from_the_sidecar(built, monkeypatch):
    """intermediates() of a debug engine: the tensors it gives (marked, or network outputs
    already), a requested tensor that could not be marked left out (as the torch backend
    leaves out a module without a single tensor), any other name refused."""
    import numpy as np

    from harness.backends.tensorrt_backend import TensorRTBackend

    engine, _, sidecar = built
    sidecar.marked_layers = ["/a/Conv_output_0"]
    sidecar.build = {"layer_tensors": ["/a/Conv_output_0", "num_dets"],
                     "unmarked": {"/a/Shape_output_0": "a shape tensor"}}
    backend = TensorRTBackend(engine)
    backend._engine, backend.sidecar = object(), sidecar  # loaded, without TensorRT
    backend.output_names = ["num_dets", "/a/Conv_output_0"]
    copied = []  # what each run copies back to the host

    def execute(x, keep=None, metas=None):
        copied.append(list(keep))
        return {"num_dets": np.ones((1, 1), np.int32),
                "/a/Conv_output_0": np.zeros(2, np.float16)}

    monkeypatch.setattr(backend, "_execute", execute)
    assert backend.intermediate_names() == ["/a/Conv_output_0", "num_dets"]
    got = backend.intermediates(None, ["/a/Conv_output_0", "/a/Shape_output_0", "num_dets"])
    assert list(got) == ["/a/Conv_output_0", "num_dets"]
    assert got["/a/Conv_output_0"].dtype == np.float32
    assert set(backend.infer(np.zeros((1, 3, 4, 4), np.float32))) == {"num_dets"}
    # infer copies back the final outputs only; run_marked those and the names asked for
    assert copied[-1] == ["num_dets"]
    final, tensors = backend.run_marked(None, ["/a/Conv_output_0"])
    assert set(final) == {"num_dets"} and set(tensors) == {"/a/Conv_output_0"}
    assert copied[-1] == ["num_dets", "/a/Conv_output_0"]
    with pytest.raises(UserError, match="has no marked tensor '/a/Relu_output_0'"):
        backend.intermediates(None, ["/a/Relu_output_0"])
