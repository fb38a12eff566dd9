"""`harness export`: writes the file and says what it wrote; bad options are one-line errors
that come before the model is loaded."""
from __future__ import annotations

import onnx
import pytest

from harness.cli import main
from harness.export.metadata import read_metadata
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG


def test_export_end2end_from_the_cli(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code = main(["export", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), "-o", str(out),
                 "--variant", "end2end", "--nms", "batched", "--keep-topk", "50",
                 "--pre-topk", "500", "--score-threshold", "0.25", "--opset", "11"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "batched NMS: keep 50" in printed
    meta = read_metadata(onnx.load(str(out)))
    assert meta["nms"] == {"kind": "batched", "keep_topk": 50, "pre_topk": 500,
                           "iou_threshold": 0.65, "score_threshold": 0.25}
    assert meta["opset"] == 11


@pytest.mark.parametrize("argv, message", [
    (["--variant", "end2end"], "needs --nms"),
    (["--nms", "onnx"], "end2end only"),
    (["--opset", "8"], "--opset 8"),
    (["--precision", "int8"], "--calib"),
    (["--precision", "int8", "--calib", "/nonexistent/calib"], "calibration folder not found"),
])
def test_cli_option_errors_are_one_line(tmp_path, capsys, argv, message):
    code = main(["export", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), "-o",
                 str(tmp_path / "m.onnx"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_needs_a_checkpoint_or_random_init(tmp_path, capsys):
    code = main(["export", str(FIXTURE_CONFIG), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--random-init" in err and len(err.splitlines()) == 1
