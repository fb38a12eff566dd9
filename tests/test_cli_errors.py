"""Bad input → one clear line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG, shipped_config


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def image(varied_images) -> Path:
    return varied_images[0]


def test_missing_config(capsys, tmp_path, image):
    code, err = run_cli(capsys, "detect", tmp_path / "nope.py", FIXTURE_CHECKPOINT, image)
    assert_one_line_error(code, err, "config not found", "nope.py")


def test_missing_checkpoint(capsys, tmp_path, image):
    code, err = run_cli(capsys, "detect", FIXTURE_CONFIG, tmp_path / "nope.pth", image)
    assert_one_line_error(code, err, "checkpoint not found")


def test_config_with_syntax_error(capsys, tmp_path, image):
    bad = tmp_path / "bad.py"
    bad.write_text("model = dict(type='YOLODetector'\n")
    code, err = run_cli(capsys, "detect", bad, FIXTURE_CHECKPOINT, image)
    assert_one_line_error(code, err, "cannot read config")


def test_config_that_is_not_an_mmyolo_detector(capsys, tmp_path, image):
    cfg = tmp_path / "classifier.py"
    cfg.write_text("model = dict(type='ImageClassifier', backbone=dict(type='ResNet'))\n")
    code, err = run_cli(capsys, "detect", cfg, FIXTURE_CHECKPOINT, image)
    assert_one_line_error(code, err, "not an mmyolo detector")


def test_corrupt_checkpoint(capsys, tmp_path, image):
    bad = tmp_path / "corrupt.pth"
    data = FIXTURE_CHECKPOINT.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    code, err = run_cli(capsys, "detect", FIXTURE_CONFIG, bad, image)
    assert_one_line_error(code, err, "corrupt")


def test_checkpoint_that_is_not_a_checkpoint(capsys, tmp_path, image):
    bad = tmp_path / "text.pth"
    bad.write_text("hello")
    code, err = run_cli(capsys, "detect", FIXTURE_CONFIG, bad, image)
    assert_one_line_error(code, err, "text.pth")


def test_checkpoint_with_unsafe_pickle(capsys, tmp_path, image):
    bad = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"obj": Path("x")}}, bad)
    code, err = run_cli(capsys, "detect", FIXTURE_CONFIG, bad, image)
    assert_one_line_error(code, err, "does not unpickle")


def test_checkpoint_of_another_class_count(capsys, tmp_path, image):
    # the fixture's config with 80 classes: every prediction conv differs in shape
    cfg = tmp_path / "eighty.py"
    text = FIXTURE_CONFIG.read_text().replace(
        "class_names = ('disc', 'rectangle', 'triangle', 'cross', 'ring')",
        "class_names = tuple(f'c{i}' for i in range(80))")
    cfg.write_text(text)
    code, err = run_cli(capsys, "detect", cfg, FIXTURE_CHECKPOINT, image)
    assert_one_line_error(code, err, "class count mismatch", "5", "80")


def test_checkpoint_of_another_model(capsys, tmp_path, image):
    # YOLOv8-n's shipped config with the fixture's YOLOv5 weights
    code, err = run_cli(capsys, "detect", shipped_config("yolov8"), FIXTURE_CHECKPOINT, image)
    assert_one_line_error(code, err, "does not fit config")


def test_unreadable_image(capsys, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    code, err = run_cli(capsys, "detect", FIXTURE_CONFIG, FIXTURE_CHECKPOINT, bad)
    assert_one_line_error(code, err, "cannot decode image", "broken.jpg")


def test_synth_into_unwritable_folder(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_cli(capsys, "synth", blocker / "out", "--images", "2")
    assert_one_line_error(code, err, "out")


def test_detect_prints_detections(capsys, image, tmp_path):
    out = tmp_path / "det.json"
    code = main(["detect", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), str(image),
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "detections" in printed and out.is_file()


def test_compare_takes_a_two_stage_detector(capsys, tmp_path, image):
    """`harness compare` on the shipped two-stage fixture: the raw fp32 file exported into
    --out, exit 0, a verdict that says how the proposals compare, and the report's proposal
    section."""
    import json

    from harness.models.zoo import TWO_STAGE_FIXTURE_CHECKPOINT, TWO_STAGE_FIXTURE_CONFIG

    out = tmp_path / "out"
    code = main([str(a) for a in ("compare", TWO_STAGE_FIXTURE_CONFIG,
                                  TWO_STAGE_FIXTURE_CHECKPOINT, "--images", image.parent,
                                  "--count", 1, "--no-layers", "--out", out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "proposals:" in printed
    doc = json.loads((out / "results.json").read_text())["compare"]
    assert doc["targets"][0]["proposals"]["unexplained"] == 0
    assert "### Proposals" in (out / "compare.md").read_text()


def test_a_two_stage_checkpoint_of_another_class_count_is_one_line(capsys, tmp_path, image):
    """The two-stage source checks a checkpoint against its config as the one-stage does."""
    from harness.models.zoo import TWO_STAGE_FIXTURE_CHECKPOINT

    cfg = Path(__file__).parent.parent / "harness" / "fixture" / "faster_rcnn_r18_synth_320.py"
    other = tmp_path / "frcnn_7.py"
    other.write_text(cfg.read_text().replace("num_classes = len(class_names)",
                                             "num_classes = 7"))
    code, err = run_cli(capsys, "detect", other, TWO_STAGE_FIXTURE_CHECKPOINT, image)
    assert_one_line_error(code, err, "class count mismatch", "num_classes=7")
