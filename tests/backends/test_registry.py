"""A new runtime is one Backend subclass plus one line in the registry: this test registers
one (onnxruntime under another name, opening `.ortlite` files) and sees it validated in an
experiment's matrix, run as coco matrix rows, opened as a compare target, and rendered in
coco.md, the AP-vs-latency plot and compare.md — with no other change to the harness."""
from __future__ import annotations

import json
import shutil

import pytest

from harness.backends.onnxruntime_backend import OnnxruntimeBackend
from harness.backends.registry import BACKENDS, class_for_file, precisions_by_backend
from harness.errors import UserError
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG


class OrtLite(OnnxruntimeBackend):
    """The whole new backend: its facts; the runtime is onnxruntime's."""

    name = "ortlite"
    label = "ORT-lite"
    precisions = ("fp32",)
    devices = ("cpu",)
    file_suffixes = (".ortlite",)
    file_kind = "ortlite"
    plot_marker = "P"


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(BACKENDS, OrtLite.name, OrtLite)  # the one registry line
    return OrtLite


def test_unregistered_names_are_refused_with_the_known_ones(tmp_path):
    from harness.experiment import matrix_configurations

    with pytest.raises(UserError, match="unknown backend 'ortlite'; choose from torch, "
                                        "onnxruntime, tensorrt"):
        matrix_configurations(["ortlite"], ["fp32"], [1], ["cpu"])
    with pytest.raises(UserError, match="no backend opens; known: onnx"):
        class_for_file(tmp_path / "model.ortlite")


def test_a_registered_backend_is_validated_and_paired(registered, tmp_path):
    from harness.experiment import load_experiment

    exp = tmp_path / "e.toml"
    exp.write_text(f"""
name = "lite"
[model]
config = "{FIXTURE_CONFIG}"
checkpoint = "{FIXTURE_CHECKPOINT}"
[data]
images = "{tmp_path}"
[matrix]
backends = ["torch", "ortlite"]
precisions = ["fp32", "fp16"]
batches = [2]
""")
    configs = load_experiment(exp).matrix.configurations()
    # its own precisions only: no ortlite fp16 row
    assert [(c.backend, c.precision) for c in configs] == [
        ("torch", "fp32"), ("torch", "fp16"), ("ortlite", "fp32")]
    assert precisions_by_backend()["ortlite"] == ("fp32",)
    assert class_for_file(tmp_path / "model.ortlite") is registered


@pytest.mark.slow
def test_a_registered_backend_runs_in_coco_and_compare(registered, tmp_path, capsys,
                                                       fixture_onnx):
    from harness.cli import main
    from harness.synth import generate_synthetic_coco

    generate_synthetic_coco(tmp_path / "data", images=8, seed=2, val_fraction=0.5)
    out = tmp_path / "report"
    code = main(["coco", str(tmp_path / "data" / "val2017"), "--backends", "torch", "ortlite",
                 "--precisions", "fp32", "--batches", "2", "--runs", "2", "--warmup", "0",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())["coco"]["rows"]
    torch_row, lite = rows
    assert lite["backend"] == "ortlite" and lite["status"] == "ok"
    assert lite["AP"] == pytest.approx(torch_row["AP"], abs=2e-3)  # the same fp32 graph
    md = (out / "coco.md").read_text()
    assert "| ortlite | cpu | fp32 | 2 |" in md and "ortlite cpu fp32 b2" in md
    assert (out / "coco_ap_vs_latency.png").stat().st_size > 1000

    model = shutil.copy(fixture_onnx(variant="raw").path, tmp_path / "model.ortlite")
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), str(model),
                 "--images", str(tmp_path / "data" / "val2017"), "--count", "2",
                 "--out", str(out), "--no-layers"])
    assert code == 0, capsys.readouterr()
    (target,) = json.loads((out / "results.json").read_text())["compare"]["targets"]
    assert target["kind"] == "ortlite" and target["detections"]["mismatches"] == 0
    assert "| model.ortlite | ORT-lite " in (out / "compare.md").read_text()
