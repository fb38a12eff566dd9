"""onnxruntime backend: description, intermediates, identical-input proof, TensorRT plugin
emulation, and bad files / inputs as one-line user errors (library and CLI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from harness.backends import OnnxruntimeBackend, TorchBackend
from harness.cli import main
from harness.errors import UserError
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
from harness.align.tensor_diff import relative_l2 as rel_l2




def test_describe_reports_versions_provider_precision(fixture_onnx):
    import onnxruntime

    result = fixture_onnx(variant="raw")
    backend = OnnxruntimeBackend(result.path, provider="cpu")
    backend.load()
    info = backend.describe()
    assert info["backend"] == "onnxruntime" and info["onnxruntime"] == onnxruntime.__version__
    assert info["provider"] == "CPUExecutionProvider" and info["device"] == "cpu"
    assert info["precision"] == "fp32" and info["variant"] == "raw"
    assert info["use_tf32"] is None  # only meaningful, and then recorded, on CUDA
    assert len(info["model_sha256"]) == 64 and info["plugins_emulated"] == []


def test_run_records_the_input_hash_both_backends_agree(fixture_model, fixture_onnx,
                                                        fixture_batch):
    ort_run = OnnxruntimeBackend(fixture_onnx(variant="raw").path, provider="cpu") \
        .run(fixture_batch.inputs)
    torch_run = TorchBackend(fixture_model, outputs="raw").run(fixture_batch.inputs)
    assert ort_run.input_sha256 == torch_run.input_sha256 == fixture_batch.sha256
    assert ort_run.input_shape == torch_run.input_shape == (4, 3, 320, 320)
    assert ort_run.backend["backend"] == "onnxruntime" and torch_run.backend["backend"] == "torch"
    assert ort_run.seconds > 0


def test_intermediates_match_torch_module_outputs(fixture_model, fixture_onnx, fixture_batch):
    backend = OnnxruntimeBackend(fixture_onnx(variant="raw").path, provider="cpu")
    names = backend.intermediate_names()
    tensor = "/backbone/stage1/stage1.0/activate/Mul_output_0"
    assert tensor in names and "/neck/reduce_layers.2/activate/Mul_output_0" in names
    got = backend.intermediates(fixture_batch.inputs, [tensor])
    want = TorchBackend(fixture_model).intermediates(fixture_batch.inputs,
                                                     ["backbone.stage1.0"])
    assert got[tensor].shape == want["backbone.stage1.0"].shape == (4, 32, 80, 80)
    assert rel_l2(got[tensor], want["backbone.stage1.0"]) < 1e-5
    # asking again reuses the session; unknown names are user errors with a suggestion
    assert backend.intermediates(fixture_batch.inputs[:1], [tensor])[tensor].shape[0] == 1
    with pytest.raises(UserError, match="did you mean"):
        backend.intermediates(fixture_batch.inputs, ["/backbone/stage1/stage1.0/activate/Mul"])


def test_plugin_graph_runs_with_reference_kernel_and_keeps_traces(fixture_onnx, fixture_batch):
    result = fixture_onnx(variant="end2end", nms="efficient")
    backend = OnnxruntimeBackend(result.path, provider="cpu", plugin_trace=True)
    out = backend.infer(fixture_batch.inputs)
    assert list(out) == result.metadata["outputs"]
    assert out["num_detections"].dtype == np.int32 and out["detection_classes"].dtype == np.int32
    emulated = backend.describe()["plugins_emulated"]
    assert [e["op"] for e in emulated] == ["TRT::EfficientNMS_TRT"]
    (kernel_output,) = backend.plugin_results.values()
    trace = kernel_output.traces[0]
    assert trace is not None and trace.counts()["kept"] == int(out["num_detections"][0, 0])


# -- bad files and inputs ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(fixture_onnx, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_onnx")
    good = fixture_onnx(variant="raw").path.read_bytes()
    files = {}
    files["corrupt"] = folder / "corrupt.onnx"
    files["corrupt"].write_bytes(np.random.default_rng(0).bytes(5000))
    files["truncated"] = folder / "truncated.onnx"
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["custom_op"] = folder / "custom_op.onnx"
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["images"], ["out"], domain="acme")], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 320, 320])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("acme", 1)]),
              str(files["custom_op"]))
    files["static_batch"] = fixture_onnx(variant="raw", batch=1).path
    files["small_input"] = fixture_onnx(variant="raw", input_size=(256, 256)).path
    return files


@pytest.mark.parametrize("which, message", [
    ("corrupt", "not a (readable|usable) ONNX"),
    ("truncated", "truncated"),
    ("custom_op", "acme::Frobnicate"),
])
def test_bad_files_are_user_errors(bad_files, fixture_batch, which, message):
    with pytest.raises(UserError, match=message):
        OnnxruntimeBackend(bad_files[which]).infer(fixture_batch.inputs)


def test_batch_the_file_cannot_take_is_refused_before_running(bad_files, fixture_batch):
    backend = OnnxruntimeBackend(bad_files["static_batch"], provider="cpu")
    assert backend.infer(fixture_batch.inputs[:1])["cls_scores.0"].shape[0] == 1
    with pytest.raises(UserError, match="static batch of 1.*cannot take a batch of 4"):
        backend.infer(fixture_batch.inputs)


def test_input_shape_that_does_not_fit_is_refused(bad_files, fixture_batch):
    backend = OnnxruntimeBackend(bad_files["small_input"], provider="cpu")
    with pytest.raises(UserError, match=r"does not fit .*axis 2 must be 256"):
        backend.infer(fixture_batch.inputs)


@pytest.mark.parametrize("inputs, message", [
    (np.zeros((1, 3, 320, 320), np.float64), "float32"),
    (np.zeros((3, 320, 320), np.float32), r"\(B, 3, H, W\)"),
])
def test_inputs_that_are_not_the_harness_batch_are_refused(fixture_onnx, inputs, message):
    with pytest.raises(UserError, match=message):
        OnnxruntimeBackend(fixture_onnx(variant="raw").path).infer(inputs)


@pytest.mark.parametrize("which, extra, message", [
    ("corrupt", [], "corrupt"),
    ("truncated", [], "truncated"),
    ("custom_op", [], "acme::Frobnicate"),
    ("static_batch", ["--batch", "4"], "static batch of 1"),
    ("small_input", [], "does not fit"),
])
def test_cli_bad_onnx_is_one_line_exit_2(bad_files, varied_images, capsys, which, extra,
                                         message):
    code = main(["detect", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT),
                 *map(str, varied_images), "--onnx", str(bad_files[which]), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err


def test_cli_detect_with_onnx_prints_the_files_detections(fixture_onnx, varied_images,
                                                          capsys, tmp_path):
    path = fixture_onnx(variant="end2end", nms="efficient").path
    out_json = tmp_path / "dets.json"
    code = main(["detect", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT),
                 *map(str, varied_images), "--onnx", str(path), "--batch", "4",
                 "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "end2end" in printed and "CPUExecutionProvider" in printed
    import json

    doc = json.loads(out_json.read_text())
    assert doc["backend"]["plugins_emulated"] and len(doc["images"]) == 4
    assert any(img["scores"] for img in doc["images"])


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in
                    __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu (pip install onnxruntime-gpu) and a CUDA device")
def test_cuda_provider_records_tf32_and_matches_cpu(fixture_onnx, fixture_batch):
    path = fixture_onnx(variant="raw").path
    cpu = OnnxruntimeBackend(path, provider="cpu").infer(fixture_batch.inputs)
    backend = OnnxruntimeBackend(path, provider="cuda", use_tf32=False)
    cuda = backend.infer(fixture_batch.inputs)
    info = backend.describe()
    assert info["provider"] == "CUDAExecutionProvider" and info["use_tf32"] is False
    for name in cpu:
        assert rel_l2(cuda[name], cpu[name]) < 1e-4, name
