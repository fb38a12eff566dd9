"""Experiment files: the bundled one loads, the pairing rule, and every mistake in a file is
one UserError line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import UserError
from harness.experiment import (
    Configuration, Experiment, load_experiment, matrix_configurations, resolve_path,
)
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG


MINIMAL = """
name = "tiny"
[model]
config = "cfg.py"
[data]
images = "data/val2017"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_fixture_experiment_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a shipped experiment loads from any folder
    exp = load_experiment("harness:experiments/fixture.toml")
    assert isinstance(exp, Experiment)
    assert exp.name == "fixture"
    assert exp.model.config == FIXTURE_CONFIG and exp.model.checkpoint == FIXTURE_CHECKPOINT
    assert exp.model.config.is_file() and exp.model.checkpoint.is_file()
    assert exp.data.images == Path("data/synth/val2017") and exp.data.annotations is None
    assert exp.data.count == 0
    assert exp.matrix.batches == (1, 4) and exp.matrix.devices == ("cpu",)
    assert (exp.latency.warmup, exp.latency.runs) == (5, 50)
    assert exp.compare.count == 16
    assert exp.gates == {}
    keys = {c.key for c in exp.matrix.configurations()}
    assert {"torch_cpu_fp32_b1", "torch_cpu_bf16_b4", "onnxruntime_cpu_int8_b4",
            "tensorrt_cuda_fp16_b1"} <= keys
    assert not any("torch" in k and "int8" in k for k in keys)
    assert exp.results_section().to_json() == {
        "name": "fixture", "path": "harness:experiments/fixture.toml", "gates": {}}


def test_every_shipped_experiment_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shipped = sorted(p.name for p in (FIXTURE_CONFIG.parents[1] / "experiments").glob("*.toml"))
    assert shipped == ["demo.toml", "fixture.toml", "gpu_h100.toml"]
    for name in shipped:
        exp = load_experiment(f"harness:experiments/{name}")
        assert exp.model.config == FIXTURE_CONFIG and exp.model.checkpoint == FIXTURE_CHECKPOINT


def test_packaged_paths_resolve_in_the_package_others_stay_relative(tmp_path):
    exp = load_experiment(write(tmp_path, """
name = "mixed"
[model]
config = "harness:fixture/yolov5_n_synth_320.py"
checkpoint = "ckpt/model.pth"
onnx = { fp32 = "harness:fixture/yolov5_n_synth_320.py" }
[data]
images = "data/val2017"
annotations = "ann.json"
"""))
    assert exp.model.config == FIXTURE_CONFIG and exp.model.config.is_absolute()
    assert exp.model.checkpoint == Path("ckpt/model.pth")
    assert exp.model.onnx == {"fp32": FIXTURE_CONFIG}
    assert (exp.data.images, exp.data.annotations) == (Path("data/val2017"), Path("ann.json"))
    assert resolve_path("x/y.toml", tmp_path) == tmp_path / "x/y.toml"
    assert resolve_path("harness:fixture/yolov5_n_synth_320.pth", tmp_path) == FIXTURE_CHECKPOINT


@pytest.mark.parametrize("spelled, message", [
    ("harness:fixture/nope.pth", "harness:fixture/nope.pth not found in the harness package "
                                 "(it ships harness:experiments/demo.toml"),
    ("harness:", "name a file inside the harness package"),
    ("harness:../pyproject.toml", "name a file inside the harness package"),
])
def test_a_missing_packaged_file_is_one_line(spelled, message):
    with pytest.raises(UserError) as err:
        resolve_path(spelled)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_frozen(tmp_path):
    exp = load_experiment(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        exp.name = "other"  # type: ignore[misc]


def test_defaults_and_relative_paths_stay_relative_to_cwd(tmp_path):
    exp = load_experiment(write(tmp_path, MINIMAL))
    # relative to where harness runs, not to the file's folder
    assert exp.model.config == Path("cfg.py")
    assert exp.data.images == Path("data/val2017")
    assert exp.model.checkpoint is None and dict(exp.model.onnx) == {}
    assert exp.matrix.backends == ("torch", "onnxruntime", "tensorrt")
    assert exp.matrix.precisions == ("fp32", "fp16", "bf16", "int8")
    assert exp.latency.warmup is None and exp.latency.runs is None


def test_model_files_and_gates_verbatim(tmp_path):
    exp = load_experiment(write(tmp_path, MINIMAL.replace(
        'config = "cfg.py"',
        'config = "cfg.py"\nonnx = { fp16 = "m16.onnx" }\nengines = { int8 = "m.engine" }')
        + '[gates]\nmax_delta_ap = { fp16 = 0.002, int8 = 0.02 }\nname = "x"\n'))
    assert dict(exp.model.onnx) == {"fp16": Path("m16.onnx")}
    assert dict(exp.model.engines) == {"int8": Path("m.engine")}
    assert exp.results_section().gates == {"max_delta_ap": {"fp16": 0.002, "int8": 0.02},
                                              "name": "x"}


def test_pairing_rule():
    configs = matrix_configurations(["torch", "onnxruntime", "tensorrt"],
                                    ["fp32", "bf16", "int8"], [1, 4], ["cpu"])
    keys = [c.key for c in configs]
    assert keys == ["torch_cpu_fp32_b1", "torch_cpu_fp32_b4", "torch_cpu_bf16_b1",
                    "torch_cpu_bf16_b4", "onnxruntime_cpu_fp32_b1", "onnxruntime_cpu_fp32_b4",
                    "onnxruntime_cpu_int8_b1", "onnxruntime_cpu_int8_b4",
                    "tensorrt_cuda_fp32_b1", "tensorrt_cuda_fp32_b4",
                    "tensorrt_cuda_int8_b1", "tensorrt_cuda_int8_b4"]
    # tensorrt is on cuda whatever devices say, listed once
    both = matrix_configurations(["tensorrt"], ["fp16"], [1], ["cpu", "cuda"])
    assert both == [Configuration("tensorrt", "cuda", "fp16", 1)]


@pytest.mark.parametrize("backends, precisions, batches, devices, needle", [
    (["caffe"], ["fp32"], [1], ["cpu"], "unknown backend 'caffe'"),
    (["torch"], ["fp8"], [1], ["cpu"], "unknown precision 'fp8'"),
    (["torch"], ["fp32"], [0], ["cpu"], "batch sizes must be"),
    (["torch"], ["fp32"], [1], ["tpu"], "unknown device 'tpu'"),
])
def test_matrix_mistakes(backends, precisions, batches, devices, needle):
    with pytest.raises(UserError, match=needle):
        matrix_configurations(backends, precisions, batches, devices)


@pytest.mark.parametrize("text, needle", [
    ("colour = 'red'\n" + MINIMAL, "unknown key 'colour' in the top level"),
    (MINIMAL.replace('images = "data/val2017"', 'images = "d"\nsplit = 1'),
     "unknown key 'split' in [data]"),
    (MINIMAL + "[matrix]\nbackend = ['torch']\n", "unknown key 'backend' in [matrix]"),
    (MINIMAL + "[latency]\nwarm_up = 3\n", "unknown key 'warm_up' in [latency]"),
    (MINIMAL + "[compare]\ncont = 3\n", "unknown key 'cont' in [compare]"),
    (MINIMAL + "[plots]\n", "unknown key 'plots'"),
    (MINIMAL.replace('name = "tiny"', "name = 3"), "'name' must be a string"),
    (MINIMAL.replace('name = "tiny"', ""), "missing 'name'"),
    (MINIMAL.replace('name = "tiny"', 'name = "a/b"'), "plain folder name"),
    (MINIMAL.replace('config = "cfg.py"', ""), "missing 'model.config'"),
    (MINIMAL.split("[data]")[0], "missing table [data]"),
    (MINIMAL.replace('images = "data/val2017"', 'images = "d"\ncount = true'),
     "'data.count' must be a whole number"),
    (MINIMAL.replace('images = "data/val2017"', 'images = "d"\ncount = -1'),
     "data.count must be 0"),
    (MINIMAL + "[matrix]\nbatches = ['1', '4']\n", "'matrix.batches' must be a list of whole"),
    (MINIMAL + "[matrix]\nbatches = 4\n", "'matrix.batches' must be a list"),
    (MINIMAL + "[matrix]\nbatches = [0]\n", "matrix.batches must be >= 1"),
    (MINIMAL + "[matrix]\nbackends = ['tflite']\n", "matrix.backends has unknown 'tflite'"),
    (MINIMAL + "[matrix]\nprecisions = []\n", "matrix.precisions is empty"),
    (MINIMAL + "[latency]\nruns = 1.5\n", "'latency.runs' must be a whole number"),
    (MINIMAL + "[latency]\nruns = 0\n", "latency.runs >= 1"),
    (MINIMAL + "[compare]\nscore_tol = 'high'\n", "'compare.score_tol' must be a number"),
    (MINIMAL.replace('config = "cfg.py"', 'config = "cfg.py"\nonnx = { fp64 = "a.onnx" }'),
     "model.onnx has unknown precision 'fp64'"),
    (MINIMAL.replace('config = "cfg.py"', 'config = "cfg.py"\nonnx = "a.onnx"'),
     "'model.onnx' must be a table"),
    (MINIMAL.replace('config = "cfg.py"', 'config = "cfg.py"\nengines = { fp16 = 1 }'),
     "'model.engines.fp16' must be a string"),
    ('name = "x"\nmodel = 3\n[data]\nimages = "d"\n', "'model' must be a table"),
])
def test_mistakes_are_one_line_user_errors(tmp_path, text, needle):
    with pytest.raises(UserError) as info:
        load_experiment(write(tmp_path, text))
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert "exp.toml" in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="experiment file not found: .*nope.toml"):
        load_experiment(tmp_path / "nope.toml")


def test_bad_toml(tmp_path):
    with pytest.raises(UserError, match="is not valid TOML") as info:
        load_experiment(write(tmp_path, 'name = "x\n[model]\n'))
    assert "\n" not in str(info.value)


def test_packaged_paths_work_on_the_command_line(capsys, varied_images):
    """`harness:fixture/...` names the shipped fixtures on the command line too, not only in
    experiment files; a packaged name that does not exist is one line."""
    from harness.cli import main

    assert main(["detect", "harness:fixture/faster_rcnn_r18_synth_320.py",
                 "harness:fixture/faster_rcnn_r18_synth_320.pth", str(varied_images[0])]) == 0
    capsys.readouterr()
    assert main(["detect", "harness:fixture/nope.py", "harness:fixture/yolov5_n_synth_320.pth",
                 str(varied_images[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found in the harness package" in err and len(err.splitlines()) == 1
