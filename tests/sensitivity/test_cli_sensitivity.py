"""`harness sensitivity` end to end on the fixture, int8 (minmax), 8 images of the synthetic
split plus 4 held out: interrupted after five measurements, resumed by the command (which
measures only the rest), rerun (which measures nothing); the report, results.json, the
mixed ONNX and the TensorRT constraints agree with each other, and the fp32 and all-int8 APs
are the ones `harness coco` measures on the same images. Bad input is one line, exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from harness.cli import main
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
from harness.results import read_results
from harness.sensitivity.runner import SensitivitySettings, run_sensitivity
from harness.sensitivity.search import DeltaLimit

from tests.eval.split_data import make_split

pytestmark = pytest.mark.slow

COUNT, HOLDOUT, CALIB = 8, 4, 8


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("sensitivity_split"))


def argv(split: Path, out: Path) -> list[str]:
    return ["sensitivity", str(FIXTURE_CONFIG), str(FIXTURE_CHECKPOINT), "--images", str(split),
            "--count", str(COUNT), "--holdout", str(HOLDOUT), "--groups", "stage",
            "--max-delta-ap", "50%", "--calib-count", str(CALIB), "--out", str(out),
            "--no-progress"]


def test_interrupted_resumed_rerun_and_consistent(split, tmp_path, capsys):
    out = tmp_path / "report"
    settings = SensitivitySettings(
        config=FIXTURE_CONFIG, checkpoint=FIXTURE_CHECKPOINT, images=split, out=out,
        count=COUNT, holdout=HOLDOUT, level="stage", limit=DeltaLimit.parse("50%"),
        calib_count=CALIB, progress=False)
    measured: list[str] = []

    def interrupt_after_five(message: str) -> None:
        if message.endswith(" s)"):  # "<label>: AP 0.5123 (8 images, 1.2 s)": stored
            measured.append(message)
            if len(measured) == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sensitivity(settings, log=interrupt_after_five)
    stores = list((out / "cache" / "sensitivity").glob("ap-*.jsonl"))
    assert len(stores) == 1
    assert sum('"kind":"ap"' in line for line in stores[0].read_text().splitlines()) == 5

    code = main(argv(split, out))
    printed = capsys.readouterr().out
    doc = read_results(out).sensitivity
    assert code == (0 if doc.met else 1)
    assert doc.measurements["stored"] == 5  # fp32, all int8 and three groups: not again
    first_run = doc.measurements["measured"]
    # 2 + 15 single groups + the greedy's combined sets + 3 held out
    combined = sum(len(s.groups) > 1 for s in doc.steps)
    assert 5 + first_run == 2 + 15 + combined + (3 if doc.chosen else 2)
    assert f"verdict: {doc.verdict}" in printed

    # the numbers agree with each other
    assert doc.precision == "int8" and doc.level == "stage" and len(doc.groups) == 15
    assert doc.dataset["images"] == COUNT and doc.holdout.images == HOLDOUT
    assert sum(g.flop_share for g in doc.groups) == pytest.approx(1.0)
    assert sum(g.quantized_ops for g in doc.groups) == 60
    assert 1.0 < doc.total_gflops < 1.2
    loss = doc.AP_fp32 - doc.AP_quantized
    assert doc.delta_AP_quantized == pytest.approx(-loss)
    assert doc.limit == pytest.approx(0.5 * max(loss, 0.0))
    for g in doc.groups:
        assert g.recovered == pytest.approx(g.AP - doc.AP_quantized)
        assert g.recovered_per_gflop == pytest.approx(g.recovered / g.gflops)
    ranked = sorted(doc.groups, key=lambda g: g.rank)
    assert [g.rank for g in ranked] == list(range(1, 16))
    per = [g.recovered_per_gflop for g in ranked]
    assert per == sorted(per, reverse=True)
    tried = [s.added for s in doc.steps]
    assert tried == [g.name for g in ranked if g.recovered > 0][:len(tried)]
    assert doc.AP_chosen >= doc.AP_quantized
    kept = [s for s in doc.steps if s.kept]
    assert doc.chosen == (kept[-1].groups if kept else [])
    if kept:
        assert doc.AP_chosen == kept[-1].AP
    assert doc.met == (doc.AP_fp32 - doc.AP_chosen <= doc.limit)
    assert doc.recovered_chosen == pytest.approx(doc.AP_chosen - doc.AP_quantized)
    share = {g.name: g.flop_share for g in doc.groups}
    assert doc.chosen_flop_share == pytest.approx(sum(share[n] for n in doc.chosen))

    # the files: report, plot, mixed ONNX and TensorRT constraints of the chosen set
    md = (out / "sensitivity.md").read_text()
    assert doc.verdict in md and f"{doc.AP_fp32:.4f}" in md and f"{doc.AP_quantized:.4f}" in md
    assert (out / "sensitivity.png").stat().st_size > 10_000
    constraints = json.loads((out / "fp32_layers.json").read_text())
    by_name = {g.name: g for g in doc.groups}
    assert constraints["prefixes"] == [by_name[n].prefix for n in doc.chosen]
    mixed = onnx.load(str(out / doc.files["mixed_onnx"]))
    made_by = {o: n.op_type for n in mixed.graph.node for o in n.output}
    fp32_convs = {n.name for n in mixed.graph.node if n.op_type == "Conv"
                  and made_by.get(n.input[0]) != "DequantizeLinear"}
    assert fp32_convs == {n.name for n in mixed.graph.node if n.op_type == "Conv" and any(
        n.name.startswith(p) for p in constraints["prefixes"])}

    # a rerun measures nothing and says the same
    assert main(argv(split, out)) == code
    capsys.readouterr()
    again = read_results(out).sensitivity
    assert again.measurements == {"measured": 0, "stored": first_run + 5}
    assert (again.AP_fp32, again.AP_quantized, again.chosen, again.AP_chosen) == \
        (doc.AP_fp32, doc.AP_quantized, doc.chosen, doc.AP_chosen)

    # the same APs `harness coco` measures (its fp32 and its own int8 export, calibrated
    # on the same images the same way)
    coco_out = tmp_path / "coco"
    assert main(["coco", str(split), "--backends", "onnxruntime", "--precisions", "fp32",
                 "int8", "--batches", "4", "--count", str(COUNT), "--calib-count", str(CALIB),
                 "--warmup", "0", "--runs", "1", "--evaluator", "pycocotools", "--out",
                 str(coco_out), "--no-progress"]) == 0
    capsys.readouterr()
    rows = {r.precision: r.AP for r in read_results(coco_out).coco.rows}
    assert rows["fp32"] == pytest.approx(doc.AP_fp32, abs=1e-9)
    assert rows["int8"] == pytest.approx(doc.AP_quantized, abs=1e-9)


@pytest.mark.parametrize("change, message", [
    (lambda a, t: a.__setitem__(4, str(t / "nowhere")), "image folder not found"),
    (lambda a, t: a.__setitem__(2, str(t / "missing.pth")), "checkpoint"),
    (lambda a, t: a.__setitem__(1, str(t / "missing.py")), "config not found"),
    (lambda a, t: a.__setitem__(a.index("--max-delta-ap") + 1, "half"), "--max-delta-ap"),
    (lambda a, t: a.__setitem__(a.index("--count") + 1, "0"), "--holdout takes the images"),
], ids=["images", "checkpoint", "config", "limit", "holdout"])
def test_bad_input_is_one_line_exit_2(split, tmp_path, capsys, change, message):
    args = argv(split, tmp_path / "out")
    change(args, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness sensitivity: error: ") and message in err, err
    assert "\n" not in err
