"""`harness compare` end to end through the CLI: the default export, the report files, a
TensorRT engine on a machine without TensorRT as a "not available" column, bad input."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
from tests.test_cli_errors import assert_one_line_error, run_cli


def test_compare_without_targets_exports_and_writes_the_report(capsys, tmp_path,
                                                               varied_images):
    out = tmp_path / "report"
    images = varied_images[0].parent
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), "--images",
                 str(images), "--count", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    onnx_file = out / f"{FIXTURE_CONFIG.stem}_raw_fp32.onnx"
    assert onnx_file.is_file() and (out / "layers.png").stat().st_size > 1000
    doc = json.loads((out / "results.json").read_text())["compare"]
    (target,) = doc["targets"]
    assert target["available"] and target["variant"] == "raw"
    assert target["detections"]["mismatches"] == 0 and target["layers"]["rows"]
    md = (out / "compare.md").read_text()
    for heading in ("**Verdict:**", "## Inputs", "## Backends", "## Layers",
                    "## Detections after NMS", "### Before NMS"):
        assert heading in md
    assert doc["verdict"] in md and "matches PyTorch" in doc["verdict"]
    assert md.index("## Inputs") < md.index("## Backends") < md.index("## Verdict") \
        < md.index("## Layers") < md.index("## Detections after NMS")

    # again, with the exported file reused and an engine this machine cannot run
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), str(onnx_file),
                 str(engine), "--images", str(images), "--count", "2", "--out", str(out),
                 "--no-layers"])
    printed = capsys.readouterr().out
    assert "exporting" not in printed
    doc = json.loads((out / "results.json").read_text())["compare"]
    onnx_t, engine_t = doc["targets"]
    assert onnx_t["available"] and onnx_t["layers"]["rows"] == []
    # nothing was compared for the engine: exit 1, whatever the reason
    assert code == 1 and not engine_t["available"] and "not compared: model.engine" in printed
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert engine_t["reason"].startswith("not available: TensorRT is not available")
        assert engine_t["reason"] in (out / "compare.md").read_text()


@pytest.mark.parametrize("target, message", [
    ("model.bin", "is a file no backend opens; known: onnx (.onnx), engine"),
    ("missing.onnx", "onnx file not found"),
])
def test_bad_targets(capsys, tmp_path, varied_images, target, message):
    if target.endswith(".bin"):
        (tmp_path / target).write_bytes(b"x")
    code, err = run_cli(capsys, "compare", FIXTURE_CONFIG, FIXTURE_CHECKPOINT,
                        tmp_path / target, "--images", varied_images[0].parent)
    assert_one_line_error(code, err, message)


def test_missing_image_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "compare", FIXTURE_CONFIG, FIXTURE_CHECKPOINT, "--images",
                        tmp_path / "nowhere")
    assert_one_line_error(code, err, "image folder not found")


def test_corrupt_onnx_target_is_a_row_and_exit_1(capsys, tmp_path, fixture_onnx,
                                                 varied_images):
    """A file that cannot be loaded gets a report row saying why; the good one beside it is
    still compared; exit 1 because not everything asked for ran."""
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00garbage")
    good = fixture_onnx(variant="raw").path
    out = tmp_path / "out"
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), str(bad), str(good),
                 "--images", str(varied_images[0].parent), "--count", "1", "--out", str(out),
                 "--no-layers"])
    printed = capsys.readouterr().out
    assert code == 1 and "not compared: broken.onnx" in printed
    doc = json.loads((out / "results.json").read_text())["compare"]
    broken, fine = doc["targets"]
    assert not broken["available"] and broken["status"] == "failed"
    assert broken["reason"].startswith("could not be compared: ") and "not a readable ONNX" in broken["reason"]
    assert fine["available"] and fine["detections"]["mismatches"] == 0
    assert broken["reason"] in (out / "compare.md").read_text()


def test_compare_from_an_experiment_file(capsys, tmp_path, varied_images):
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
name = "cmp"
[model]
config = "{FIXTURE_CONFIG}"
checkpoint = "{FIXTURE_CHECKPOINT}"
[data]
images = "{varied_images[0].parent}"
[compare]
count = 2
batch = 2
layers = ["backbone.stem"]
[gates]
max_unexplained = 0
""")
    out = tmp_path / "out"
    code = main(["compare", "--experiment", str(exp), "--out", str(out)])
    assert code == 0, capsys.readouterr()
    doc = json.loads((out / "results.json").read_text())
    assert doc["experiment"]["gates"] == {"max_unexplained": 0}
    compare = doc["compare"]
    assert compare["inputs"]["count"] == 2 and compare["inputs"]["batch"] == 2
    assert [r["module"] for r in compare["targets"][0]["layers"]["rows"]] == ["backbone.stem"]


def test_compare_needs_config_and_checkpoint_without_an_experiment(capsys, tmp_path):
    code, err = run_cli(capsys, "compare", FIXTURE_CONFIG, "--images", tmp_path)
    assert_one_line_error(code, err, "give the config and the checkpoint")


def test_onnx_of_another_model_is_a_row_not_a_traceback(capsys, tmp_path, varied_images):
    """YOLOv8-n exported at the fixture's 320 px input: the same input fits, the outputs do
    not. The row says why, exit 1, no traceback."""
    from harness.export.onnx_export import ExportSettings, export_onnx
    from harness.models.mmyolo import load_mmyolo_model
    from harness.models.zoo import shipped_config

    other = tmp_path / "yolov8_320.onnx"
    export_onnx(load_mmyolo_model(shipped_config("yolov8")), other,
                ExportSettings(variant="raw", input_size=(320, 320)))
    out = tmp_path / "out"
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), str(other),
                 "--images", str(varied_images[0].parent), "--count", "2", "--out", str(out),
                 "--no-layers"])
    capsys.readouterr()
    assert code == 1  # and a report was written, not a crash in the decoder:
    (t,) = json.loads((out / "results.json").read_text())["compare"]["targets"]
    assert t["status"] == "failed" and "another model" in t["reason"]
    assert "has shape" in t["reason"] and t["reason"] in (out / "compare.md").read_text()


def test_unreadable_image_is_skipped_listed_and_exit_1(capsys, tmp_path, varied_images,
                                                      fixture_onnx):
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    for p in varied_images:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"\x00not an image")
    out = tmp_path / "out"
    code = main(["compare", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT),
                 str(fixture_onnx(variant="raw").path), "--images", str(folder),
                 "--out", str(out), "--no-layers"])
    printed = capsys.readouterr().out
    assert code == 1 and "unreadable images skipped: 1" in printed
    doc = json.loads((out / "results.json").read_text())["compare"]
    (listed,) = doc["inputs"]["unreadable"]
    assert listed["image"].endswith("broken.jpg") and "cannot decode image" in listed["reason"]
    assert doc["inputs"]["count"] == len(varied_images) and doc["inputs"]["requested"] == 5
    assert doc["targets"][0]["detections"]["mismatches"] == 0
    md = (out / "compare.md").read_text()
    assert "1 unreadable images skipped" in md and "broken.jpg" in md
