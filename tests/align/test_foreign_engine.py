"""`harness compare cfg ckpt model.engine --onnx model.onnx` for an engine another tool built
(no harness sidecar): --onnx paired with the engines in order (settings), carried to the
target (open_target → TensorRTBackend), which then names its layers and NMS node from it;
the layer diff's debug engines built with the engine's own profile and precision, or not
available with the reason in one line. On the fake runtime of tests/backends/fake_tensorrt.py
(nothing here runs TensorRT)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from harness.align.targets import layer_backend, open_target
from harness.backends.tensorrt_sidecar import read_sidecar
from harness.errors import UserError
from harness.settings import compare_settings
from tests.backends.fake_tensorrt import (FAKE_GPU, batch_profiles, chain_onnx,
                                          fake_engine_bytes, layer_name, layer_tensor,
                                          nms_engine_io, use_fake_runtime)
from tests.test_cli_errors import assert_one_line_error, run_cli


def touch(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


def test_onnx_pairs_with_the_engines_in_order(tmp_path):
    a, b = touch(tmp_path / "a.engine"), touch(tmp_path / "b.plan")
    raw = touch(tmp_path / "raw.onnx")
    oa, ob = touch(tmp_path / "a.onnx"), touch(tmp_path / "b.onnx")
    base = dict(paths=["cfg.py", "ckpt.pth", raw, a, b], images=tmp_path)
    assert compare_settings(**base, onnx=[oa, ob]).engine_onnx == {a: oa, b: ob}
    assert compare_settings(**base, onnx=[oa]).engine_onnx == {a: oa}
    assert compare_settings(**base).engine_onnx == {}
    with pytest.raises(UserError, match="3 --onnx for 2 engine"):
        compare_settings(**base, onnx=[oa, ob, raw])
    with pytest.raises(UserError, match="--onnx .*gone.onnx not found"):
        compare_settings(**base, onnx=[tmp_path / "gone.onnx"])


def test_compare_cli_takes_onnx_per_engine(capsys, tmp_path):
    from harness.commands.compare import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["cfg.py", "ckpt.pth", "m.engine", "--onnx", "m.onnx"])
    assert args.onnx == [Path("m.onnx")]
    onnx_file = touch(tmp_path / "m.onnx")
    code, err = run_cli(capsys, "compare", "cfg.py", "ckpt.pth", "x.onnx", "--images",
                        tmp_path, "--onnx", onnx_file)
    assert_one_line_error(code, err, "1 --onnx for 0 engine(s)")


@pytest.fixture
def foreign_engine(monkeypatch, tmp_path):
    """engine(detailed=False) → (engine path, its source ONNX): chain_onnx's end2end graph
    built by "another tool" with a batch profile 2..8 and fp16 kernels (shown only when the
    inspector is detailed)."""
    use_fake_runtime(monkeypatch)
    onnx_path = chain_onnx(tmp_path / "model.onnx", 5, nms=True)

    def engine(detailed: bool = False) -> tuple[Path, Path]:
        layers = [{"Name": layer_name(i), "LayerType": "CaskConvolution",
                   "Outputs": [{"Name": layer_tensor(i), "Dimensions": [4, 3, 8, 8],
                                "Format/Datatype": "Channel major FP16 format"}]}
                  for i in range(5)] + [{"Name": "/nms", "LayerType": "PluginV2"}]
        path = tmp_path / ("detailed.engine" if detailed else "model.engine")
        path.write_bytes(fake_engine_bytes(nms_engine_io(), batch_profiles(2, 4, 8), layers,
                                           verbosity="DETAILED" if detailed else
                                           "LAYER_NAMES_ONLY"))
        return path, onnx_path

    return engine


def test_open_target_carries_onnx_to_the_engine(foreign_engine, capsys):
    engine, onnx_path = foreign_engine()
    target = open_target(engine, onnx=onnx_path)
    assert target.available and target.kind == "engine" and target.onnx_path == onnx_path
    assert target.precision == "unknown"
    info = target.info
    assert info["settings_source"] == "source onnx" and not info["sidecar"]
    assert info["nms_plugin"]["op_type"] == "EfficientNMS_TRT"
    assert info["warnings"][0].startswith("no harness sidecar:")
    assert json.loads(json.dumps(info)) == info  # lands in results.json as it is
    assert "no harness sidecar" in capsys.readouterr().err
    alone = open_target(engine)
    assert alone.onnx_path is None and alone.info["settings_source"] == "assumed"
    with pytest.raises(UserError, match="--onnx names an engine's source ONNX; model.onnx is "
                                        "not an engine"):
        open_target(onnx_path, onnx=onnx_path)


def test_session_opens_each_engine_with_its_onnx(foreign_engine):
    from harness.align.session import open_or_say_why

    engine, onnx_path = foreign_engine()
    assert open_or_say_why(engine, "cpu", onnx_path).onnx_path == onnx_path
    broken = engine.with_name("broken.engine")
    broken.write_bytes(b"\0")
    row = open_or_say_why(broken, "cpu", onnx_path)
    assert not row.available and row.reason.startswith(
        "could not be compared: TensorRT 10.13.0 cannot deserialize broken.engine: 1: ")


def test_layer_diff_without_onnx_or_precision_says_why(foreign_engine, tmp_path):
    engine, onnx_path = foreign_engine()
    nodes = [layer_name(i) for i in range(5)]
    with pytest.raises(UserError, match="no source ONNX names its layers; give --onnx"):
        layer_backend(open_target(engine), nodes, tmp_path / "work")
    with pytest.raises(UserError, match="precision is unknown") as exc:
        layer_backend(open_target(engine, onnx=onnx_path), nodes, tmp_path / "work")
    assert "\n" not in str(exc.value)


def test_debug_engines_built_with_the_engines_profile_and_precision(foreign_engine, tmp_path):
    engine, onnx_path = foreign_engine(detailed=True)
    target = open_target(engine, onnx=onnx_path)
    assert (target.precision, target.info["precision_source"]) == ("fp16", "engine inspector")
    nodes = [layer_name(i) for i in range(5)] + ["/head/boxes/Relu", "/head/scores/Sigmoid"]
    source = layer_backend(target, nodes, tmp_path / "work", chunk=2)
    assert [s.tensors for s in source.sets][-1] == ("/head/boxes/Relu_output_0",
                                                   "/head/scores/Sigmoid_output_0")
    assert len(source.built) == 4
    for marked in source.sets:
        side = read_sidecar(marked.path)
        assert side.precision == "fp16" and side.build["tf32"] is True
        assert (side.profile["min"][0], side.profile["opt"][0], side.profile["max"][0]) == \
            (2, 4, 8)
        assert (side.gpu_name, side.compute_capability) == FAKE_GPU
        assert list(side.build["requested"]) == list(marked.tensors)
    assert source.settings.onnx_sha256 == read_sidecar(source.sets[0].path).onnx_sha256
