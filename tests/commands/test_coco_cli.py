"""`harness coco` end to end on the synthetic split with the fixture: every row that can run
here (PyTorch CPU fp32 / fp16 / bf16, onnxruntime CPU fp32 / fp16 / int8, batch 1 and 4),
rows that cannot run say why, and the report files carry the same numbers as results.json;
a row whose latency was unsteady is marked and explained (planted timings, no clock)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.eval.latency import STAGES, STATISTICS, Stability, summarize_ms
from harness.report import coco_report
from harness.results import CocoResult

from tests.eval.split_data import copy_split, edit_annotations


def render_coco(doc: dict) -> str:
    """coco.md of a results section written by hand (as read back from results.json)."""
    return coco_report.render_coco(CocoResult.from_json(doc))


def render_csv(doc: dict) -> str:
    return coco_report.render_csv(CocoResult.from_json(doc))


# PyTorch fp16 runs on the CPU too (slowly): a row like any other
RUNS_HERE = {f"{b}_cpu_{p}_b{n}" for b, ps in (("torch", ("fp32", "fp16", "bf16")),
                                                ("onnxruntime", ("fp32", "fp16", "int8")))
             for p in ps for n in (1, 4)}
ROW_KEYS = {"backend", "device", "precision", "batch", "nms_pre", "preprocess", "status",
            "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "delta_AP",
            "per_class", "latency_ms", "latency_stability", "images_per_s", "images",
            "unreadable", "inference", "AP_reference_nms", "delta_AP_parts",
            "latency_device", "latency_per_rank", "accuracy_pass"}


# the tests that share the one full matrix run (about 40 s on 2 cores)
full_matrix = pytest.mark.slow


def key(row: dict) -> str:
    return f"{row['backend']}_{row['device']}_{row['precision']}_b{row['batch']}"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def matrix_run(synth_val, tmp_path_factory):
    """One full run from an experiment file: its exit code, report folder, results.json,
    experiment file, and the report files as they were written (a later test reruns into
    the same folder)."""
    tmp = tmp_path_factory.mktemp("coco_cli")
    exp = tmp / "synth.toml"
    exp.write_text(f"""
name = "synth-test"
[model]
config = "harness:fixture/yolov5_n_synth_320.py"
checkpoint = "harness:fixture/yolov5_n_synth_320.pth"
[data]
images = "{synth_val}"
count = 8
[matrix]
backends = ["torch", "onnxruntime", "tensorrt"]
precisions = ["fp32", "fp16", "bf16", "int8"]
batches = [1, 4]
devices = ["cpu"]
[latency]
warmup = 0
runs = 2
[gates]
max_delta_ap = {{ fp16 = 0.01, int8 = 0.05 }}
""")
    out = tmp / "report"
    code = main(["coco", "--experiment", str(exp), "--out", str(out), "--no-progress",
                 "--calib-count", "8"])
    results = json.loads((out / "results.json").read_text())
    files = {name: (out / name).read_bytes() for name in
             ("coco.md", "coco.csv", "coco_ap_vs_latency.png")}
    return code, out, results, exp, files


@full_matrix
def test_every_row_that_can_run_here(matrix_run):
    code, out, results, _, _ = matrix_run
    # exit 1: the TensorRT rows asked for could not run here (0 only when everything ran)
    assert code == (0 if all(r["status"] == "ok" for r in results["coco"]["rows"]) else 1)
    rows = results["coco"]["rows"]
    ok = {key(r) for r in rows if r["status"] == "ok"}
    assert ok == RUNS_HERE
    for r in rows:
        assert set(r) == ROW_KEYS
        if r["status"] == "ok":
            assert 0.2 < r["AP"] < 1.0, r
            assert r["images"] == 8 and r["unreadable"] == 0
            assert set(r["latency_ms"]) == {"preprocess", "infer", "post", "total"}
            assert set(r["latency_ms"]["total"]) == set(STATISTICS)
            judged = r["latency_stability"]  # stable or not depends on the machine's load
            assert judged["stable"] is (judged["reason"] is None)
            assert judged["limits"] == {"max_p99_over_median": 2.0, "max_cv": 0.25}
            assert r["images_per_s"] == pytest.approx(
                r["batch"] * 1000 / r["latency_ms"]["total"]["mean"])
            assert set(r["per_class"]) == {"disc", "rectangle", "triangle", "cross", "ring"}
            # timed on this process's device (no rank: no launcher), never averaged
            assert r["latency_device"].startswith("cpu, host ")
            assert r["latency_per_rank"] is None
            # the pass of this run: 8 images, its wall time over the inference in it
            p = r["accuracy_pass"]
            assert p["images"] == 8 and p["wall_s"] >= p["inference_s"] > 0
            assert p["ratio"] == pytest.approx(p["wall_s"] / p["inference_s"], rel=0.05)
            assert p["warmup_s"] > 0  # one untimed call on blank images before the pass
            # the pass's start to its first inference and its last to the end: within it
            assert 0 <= p["fill_s"] and 0 < p["drain_s"] and \
                p["fill_s"] + p["drain_s"] <= p["wall_s"] - p["inference_s"] + 1e-3
            parts = p["drain_parts_s"]  # the drain: the last post call, the last write
            assert set(parts) == {"post_end", "write_start", "write_end"}
            assert parts["write_start"] <= parts["write_end"] <= p["drain_s"] + 1e-3
            # which post-processing it ran (on the CPU the numpy reference: no graphs)
            assert p["post"] == {"path": "reference"}
            # its batches as the inference phase timed them alone (timed here: no launcher)
            assert p["inference_alone_s"] == pytest.approx(
                8 // r["batch"] * r["inference"]["host"]["median"] / 1e3, rel=0.01, abs=1e-4)
        else:
            assert r["AP"] is None and r["latency_ms"] is None
            assert r["latency_stability"] is None


@full_matrix
def test_tensorrt_rows_say_why(matrix_run):
    _, _, results, _, _ = matrix_run
    trt = [r for r in results["coco"]["rows"] if r["backend"] == "tensorrt"]
    assert {(r["precision"], r["batch"]) for r in trt} == \
        {(p, b) for p in ("fp32", "fp16", "int8") for b in (1, 4)}
    for r in trt:
        assert r["device"] == "cuda"
        assert r["status"].startswith(
            "not available: TensorRT is not available: No module named 'tensorrt'")


@full_matrix
def test_delta_ap_and_precision_effects(matrix_run):
    _, _, results, _, _ = matrix_run
    rows = {key(r): r for r in results["coco"]["rows"]}
    for batch in (1, 4):
        ref = rows[f"torch_cpu_fp32_b{batch}"]
        assert ref["delta_AP"] == 0.0
        for name in ("onnxruntime_cpu_fp32", "onnxruntime_cpu_fp16", "onnxruntime_cpu_int8",
                     "torch_cpu_bf16"):
            row = rows[f"{name}_b{batch}"]
            assert row["delta_AP"] == pytest.approx(row["AP"] - ref["AP"], abs=1e-12)
        # the same fp32 graph on another runtime: equal to the noise of float summation
        assert abs(rows[f"onnxruntime_cpu_fp32_b{batch}"]["delta_AP"]) < 2e-3
        assert abs(rows[f"onnxruntime_cpu_int8_b{batch}"]["delta_AP"]) < 0.1


@full_matrix
def test_results_json_layout(matrix_run):
    _, _, results, exp, _ = matrix_run
    assert results["schema"] == 2
    assert results["experiment"] == {"name": "synth-test", "path": str(exp),
                                     "gates": {"max_delta_ap": {"fp16": 0.01, "int8": 0.05}}}
    coco = results["coco"]
    assert {"created", "seconds", "dataset", "machine", "rows"} <= set(coco)
    assert coco["dataset"]["images"] == 8 and coco["dataset"]["unreadable"] == 0
    assert Path(coco["dataset"]["annotations"]).name == "instances_val2017.json"
    assert {"cpu", "gpu", "threads", "versions"} <= set(coco["machine"])
    assert coco["machine"]["versions"]["torch"]


@full_matrix
def test_report_files_carry_the_same_numbers(matrix_run):
    _, _, results, _, files = matrix_run
    rows = results["coco"]["rows"]
    md = files["coco.md"].decode()
    assert "ms/batch" in md and "ΔAP vs PyTorch fp32" in md and "## AP per class" in md
    # what each latency column times
    assert "inference median (ms/batch)" in md and "compute median (ms/batch)" in md
    assert "*Inference*: the backend alone in its own phase" in md
    # each row's pass judged inference-bound or host-bound, by its own ratio
    assert "## Accuracy pass: inference-bound or host-bound" in md
    section = md.split("## Accuracy pass")[1].split("\n## ")[0]
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in section.splitlines()
                if line.startswith("| ") and "bound" in line.rsplit("|", 2)[-2]]
    expected = ["inference-bound" if r["accuracy_pass"]["ratio"] <= 1.10 else "host-bound"
                for r in rows if r["status"] == "ok"]
    assert [v.split(":")[0].split(";")[0] for v in verdicts] == expected, section
    assert "| inference alone s | in pass / alone |" in section
    assert md.count("not available: TensorRT is not available") == 6
    table_lines = [x for x in md.splitlines() if x.startswith("| torch") or
                   x.startswith("| onnxruntime") or x.startswith("| tensorrt")]
    assert len(table_lines) >= len(rows)
    unstable = [r for r in rows if r["status"] == "ok" and not r["latency_stability"]["stable"]]
    assert ("⚠ unstable latency in" in md) is bool(unstable)
    assert ("Latency stability: all" in md) is not unstable
    ort_int8 = next(r for r in rows if key(r) == "onnxruntime_cpu_int8_b4")
    assert f"{ort_int8['AP']:.3f}" in md
    lines = list(csv.DictReader(io.StringIO(files["coco.csv"].decode())))
    assert [(x["backend"], x["precision"], int(x["batch"])) for x in lines] == \
        [(r["backend"], r["precision"], r["batch"]) for r in rows]
    for line, row in zip(lines, rows):
        if row["status"] == "ok":
            assert float(line["AP"]) == pytest.approx(row["AP"], rel=1e-5)
            assert float(line["total_p99_ms"]) == pytest.approx(
                row["latency_ms"]["total"]["p99"], rel=1e-5)
            assert line["latency_stable"] == str(row["latency_stability"]["stable"]).lower()
        else:
            assert line["AP"] == "" and line["status"] == row["status"]
    assert files["coco_ap_vs_latency.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "coco_ap_vs_latency.png" in md


@full_matrix
def test_exports_are_cached_and_reused(matrix_run, capsys):
    _, out, results, exp, _ = matrix_run
    onnx = sorted(p.name for p in (out / "cache" / "onnx").glob("*.onnx"))
    assert onnx == ["yolov5_n_synth_320_raw_fp16.onnx", "yolov5_n_synth_320_raw_fp32.onnx",
                    "yolov5_n_synth_320_raw_int8.onnx"]
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*") if p.is_file()}
    code, stdout, err = run_cli(capsys, "coco", "--experiment", exp, "--out", out,
                                "--no-progress", "--backends", "onnxruntime",
                                "--precisions", "int8", "--batches", "4",
                                "--calib-count", "8")  # the same calibration: same file
    assert code == 0, err
    assert "exporting" not in err + stdout
    unchanged = {p: p.stat().st_mtime_ns for p in mtimes}
    assert unchanged == mtimes  # nothing exported, computed or appended again
    again = json.loads((out / "results.json").read_text())["coco"]["rows"]
    before = next(r for r in results["coco"]["rows"] if key(r) == "onnxruntime_cpu_int8_b4")
    assert again[0]["AP"] == before["AP"]


# -- unstable latency in the report (planted timings) ----------------------------------------

def planted_row(backend: str, precision: str, total_seconds: np.ndarray) -> dict:
    """A row as the runner writes it, its latency from planted per-run totals."""
    stages = {s: summarize_ms(total_seconds / 3 if s != "total" else total_seconds)
              for s in STAGES}
    return {"backend": backend, "device": "cpu", "precision": precision, "batch": 1,
            "status": "ok", "AP": 0.55, "AP50": 0.8, "AP75": 0.6, "APs": 0.3, "APm": 0.5,
            "APl": 0.7, "AR1": 0.4, "AR10": 0.6, "AR100": 0.65, "delta_AP": 0.0,
            "per_class": {"disc": 0.6}, "latency_ms": stages,
            "latency_stability": Stability.of(stages).to_json(),
            "images_per_s": 1000 / stages["total"]["mean"], "images": 8, "unreadable": 0}


def planted_doc() -> dict:
    """Three configurations: ONNX Runtime steady, PyTorch fp32 timed on a busy machine (most
    runs 16 ms, three stalled for 2.6 s), TensorRT not available."""
    steady = 0.016 * (1 + 0.05 * np.sin(np.arange(50)))
    busy = steady.copy()
    busy[[5, 20, 45]] = 2.6
    trt = {"backend": "tensorrt", "device": "cuda", "precision": "fp32", "batch": 1,
           "status": "not available: TensorRT is not available", "AP": None,
           "latency_ms": None, "latency_stability": None}
    return {"dataset": {"images_dir": "val2017", "annotations": "instances_val2017.json",
                        "images": 8, "unreadable": 0},
            "machine": {"cpu": "planted", "gpu": None, "threads": 8, "usable_cores": 2,
                        "versions": {}},
            "rows": [planted_row("torch", "fp32", busy),
                     planted_row("onnxruntime", "fp32", steady), trt]}


def test_unstable_row_is_marked_and_explained():
    doc = planted_doc()
    busy, steady, _ = doc["rows"]
    assert not busy["latency_stability"]["stable"] and steady["latency_stability"]["stable"]
    md = render_coco(doc)
    lines = md.splitlines()
    torch_line = next(x for x in lines if x.startswith("| torch"))
    ort_line = next(x for x in lines if x.startswith("| onnxruntime"))
    mean = busy["latency_ms"]["total"]["mean"]
    assert f"| {mean:.3g} ⚠ unstable |" in torch_line
    assert "unstable" not in ort_line
    assert "2 of 3 configurations ran; **latency of 1 of them is unstable**" in md
    sentence = next(x for x in lines if "⚠ unstable latency in 1 of 2 configurations" in x)
    ratio = busy["latency_ms"]["total"]["p99"] / busy["latency_ms"]["total"]["median"]
    assert "p99 / median > 2 or coefficient of variation (std / mean) > 0.25" in sentence
    assert "**torch cpu fp32 b1**: p99 / median = " + f"{ratio:.3g} > 2" in sentence
    assert "onnxruntime cpu fp32 b1" not in sentence
    assert "quiet machine" in sentence and "`--runs`" in sentence
    assert "threads pinned" in sentence and "8 threads on 2 usable cores" in sentence
    # the table comes first, the explanation right below it
    assert lines.index(torch_line) < lines.index(sentence) < lines.index(
        "## Latency by stage (ms per batch)")
    assert next(x for x in lines if x.startswith("| torch cpu fp32 b1 ⚠ unstable |"))

    by_backend = {x["backend"]: x for x in csv.DictReader(io.StringIO(render_csv(doc)))}
    assert by_backend["torch"]["latency_stable"] == "false"
    assert by_backend["torch"]["latency_unstable_reason"] == \
        busy["latency_stability"]["reason"]
    assert float(by_backend["torch"]["total_cv"]) == pytest.approx(
        busy["latency_ms"]["total"]["cv"], rel=1e-5)
    assert by_backend["onnxruntime"]["latency_stable"] == "true"
    assert by_backend["onnxruntime"]["latency_unstable_reason"] == ""
    assert by_backend["tensorrt"]["latency_stable"] == ""


def test_steady_rows_say_so_and_old_rows_are_not_judged():
    doc = planted_doc()
    doc["rows"].pop(0)
    md = render_coco(doc)
    assert "unstable" not in md.replace("unstable means", "")
    assert "Latency stability: all 1 configurations that ran are within the limits " \
           "(unstable means p99 / median > 2 or" in md
    # results.json written before latency was judged: rendered as before, no verdict
    for r in doc["rows"]:
        del r["latency_stability"]
    md = render_coco(doc)
    assert "unstable" not in md and "Latency stability" not in md
    assert next(csv.DictReader(io.StringIO(render_csv(doc))))["latency_stable"] == ""


# -- mistakes: one line, exit 2 -------------------------------------------------------------

def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("harness coco: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def broken_copy(synth_val, tmp_path):
    return copy_split(synth_val, tmp_path / "coco")


def coco_args(val, tmp_path, *extra):
    return ("coco", val, "--out", tmp_path / "out", "--no-progress", "--backends", "torch",
            "--precisions", "fp32", "--batches", "1", "--runs", "1", "--warmup", "0", *extra)


def test_malformed_annotation_json(capsys, broken_copy, tmp_path):
    (broken_copy.parent / "annotations" / "instances_val2017.json").write_text("{not json")
    code, _, err = run_cli(capsys, *coco_args(broken_copy, tmp_path))
    assert_one_line_error(code, err, "not valid JSON")


def test_annotations_of_another_folder(capsys, broken_copy, tmp_path):
    edit_annotations(broken_copy, lambda d: [im.update(file_name="x" + im["file_name"])
                                             for im in d["images"]])
    code, _, err = run_cli(capsys, *coco_args(broken_copy, tmp_path))
    assert_one_line_error(code, err, "12 of the 12 images", "not in")


def test_more_categories_than_the_model_knows(capsys, broken_copy, tmp_path):
    edit_annotations(broken_copy, lambda d: d["categories"].append(
        {"id": 42, "name": "hexagon", "supercategory": "shape"}))
    code, _, err = run_cli(capsys, *coco_args(broken_copy, tmp_path))
    assert_one_line_error(code, err, "6 categories", "5 classes")


def test_category_names_that_differ(capsys, broken_copy, tmp_path):
    edit_annotations(broken_copy, lambda d: d["categories"][2].update(name="pyramid"))
    code, _, err = run_cli(capsys, *coco_args(broken_copy, tmp_path))
    assert_one_line_error(code, err, "category 'pyramid'", "not a class of the model")


def test_no_annotation_file(capsys, tmp_path):
    (tmp_path / "val2017").mkdir()
    code, _, err = run_cli(capsys, *coco_args(tmp_path / "val2017", tmp_path))
    assert_one_line_error(code, err, "expected", "instances_val2017.json", "--ann")


def test_bad_experiment_file(capsys, tmp_path):
    exp = tmp_path / "bad.toml"
    exp.write_text('name = "x"\n[model]\nconfig = "c.py"\n[data]\nimages = "d"\n'
                   '[matrix]\nbatches = "four"\n')
    code, _, err = run_cli(capsys, "coco", "--experiment", exp)
    assert_one_line_error(code, err, "'matrix.batches' must be a list")


def test_no_split_given(capsys):
    code, _, err = run_cli(capsys, "coco")
    assert_one_line_error(code, err, "give a COCO split folder")


def test_unknown_backend(capsys, synth_val, tmp_path):
    code, _, err = run_cli(capsys, "coco", synth_val, "--backends", "openvino", "--out",
                           tmp_path / "o")
    assert_one_line_error(code, err, "unknown backend 'openvino'")


def test_unreadable_image_is_skipped_and_counted(capsys, broken_copy, tmp_path):
    victim = sorted(broken_copy.glob("*.jpg"))[4]
    victim.write_bytes(victim.read_bytes()[:0] + b"\x00garbage")
    code, stdout, err = run_cli(capsys, *coco_args(broken_copy, tmp_path, "--batches", "4"))
    assert code == 1, err  # not everything asked for ran: the image is skipped, listed, counted
    assert f"skipping unreadable image {victim.name}" in err
    assert "1 unreadable images skipped" in stdout
    coco = json.loads((tmp_path / "out" / "results.json").read_text())["coco"]
    assert coco["dataset"]["unreadable"] == 1
    (listed,) = coco["dataset"]["unreadable_images"]
    assert listed["image"] == victim.name and "cannot decode image" in listed["reason"]
    row = coco["rows"][0]
    assert row["status"] == "ok" and row["images"] == 11 and row["unreadable"] == 1
    md = (tmp_path / "out" / "coco.md").read_text()
    assert "1 unreadable images skipped" in md and f"- {victim.name}: cannot decode" in md


def test_cuda_rows_without_cuda_say_why(capsys, synth_val, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the rows would run")
    code, stdout, err = run_cli(capsys, "coco", synth_val, "--devices", "cuda", "--backends",
                                "torch", "onnxruntime", "--precisions", "fp32", "--batches",
                                "1", "--out", tmp_path / "out", "--no-progress")
    assert code == 1, err  # rows asked for that cannot run here
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["coco"]["rows"]
    assert [(r["backend"], r["device"]) for r in rows] == [("torch", "cuda"),
                                                          ("onnxruntime", "cuda")]
    assert "has no CUDA device" in rows[0]["status"]
    assert rows[1]["status"].startswith("not available: ") and \
        "CUDAExecutionProvider" in rows[1]["status"] and "onnxruntime-gpu" in rows[1]["status"]
    md = (tmp_path / "out" / "coco.md").read_text()
    assert "0 of 2 configurations ran" in md and "png" not in md


def test_fresh_recomputes(capsys, synth_val, tmp_path):
    args = coco_args(synth_val, tmp_path, "--count", "4", "--batches", "4")
    assert run_cli(capsys, *args)[0] == 0
    jsonl = tmp_path / "out" / "cache" / "runs" / "torch_cpu_fp32_b4.jsonl"
    first = jsonl.read_text()
    assert run_cli(capsys, *args)[0] == 0
    assert jsonl.read_text() == first  # reused as it was
    code, _, err = run_cli(capsys, *args, "--fresh")
    assert code == 0 and "resuming" not in err
    again = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r["kind"] for r in again] == ["header"] + ["image"] * 4 + ["latency"]


def experiment_with_onnx(tmp_path, val, onnx_line: str) -> Path:
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
name = "given-onnx"
[model]
config = "harness:fixture/yolov5_n_synth_320.py"
checkpoint = "harness:fixture/yolov5_n_synth_320.pth"
{onnx_line}
[data]
images = "{val}"
count = 4
[matrix]
backends = ["onnxruntime"]
precisions = ["fp32"]
batches = [1, 4]
[latency]
warmup = 0
runs = 1
""")
    return exp


def test_given_onnx_is_used_and_a_row_that_cannot_run_fails_alone(capsys, synth_val,
                                                                   tmp_path):
    from harness.export.onnx_export import ExportSettings, export_onnx
    from harness.models.mmyolo import load_mmyolo_model
    from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG

    static = tmp_path / "static_b1.onnx"
    export_onnx(load_mmyolo_model(FIXTURE_CONFIG, FIXTURE_CHECKPOINT), static,
                ExportSettings(batch=1))
    exp = experiment_with_onnx(tmp_path, synth_val, f'onnx = {{ fp32 = "{static}" }}')
    code, stdout, err = run_cli(capsys, "coco", "--experiment", exp, "--out",
                                tmp_path / "out", "--no-progress")
    assert code == 1, err  # one row failed: not everything asked for ran
    assert "exporting" not in err and "1 of 2 configurations did not run" in stdout
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["coco"]["rows"]
    assert rows[0]["status"] == "ok" and rows[0]["batch"] == 1
    assert rows[1]["status"].startswith("failed: ") and "static batch of 1" in rows[1]["status"]
    assert rows[1]["AP"] is None


def test_given_onnx_that_is_missing(capsys, synth_val, tmp_path):
    exp = experiment_with_onnx(tmp_path, synth_val, 'onnx = { fp32 = "nowhere.onnx" }')
    code, _, err = run_cli(capsys, "coco", "--experiment", exp, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "nowhere.onnx not found", "model.onnx.fp32")


@pytest.mark.slow
def test_two_stage_fixture_across_backends_and_batches(synth_val, tmp_path, capsys):
    """The two-stage fixture (mmdet Faster R-CNN) in a coco matrix: PyTorch and onnxruntime
    (the whole detector in one graph, fed img_shape, batches padded to its 320x320 input) at
    batch 1 and 4 all run, and agree on AP (PyTorch pads a batch of 4 to its largest image,
    the file to 320x320: that is the only difference)."""
    from harness.models.zoo import TWO_STAGE_FIXTURE_CHECKPOINT, TWO_STAGE_FIXTURE_CONFIG

    code, out, err = run_cli(
        capsys, "coco", synth_val, "--cfg", TWO_STAGE_FIXTURE_CONFIG,
        "--ckpt", TWO_STAGE_FIXTURE_CHECKPOINT, "--backends", "torch",
        "onnxruntime", "--precisions", "fp32", "--batches", "1", "4", "--count", "8",
        "--warmup", "0", "--runs", "1", "--out", tmp_path / "report", "--no-progress")
    assert code == 0, out + err
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["coco"]["rows"]
    assert {key(r) for r in rows} == {f"{b}_cpu_fp32_b{n}" for b in ("torch", "onnxruntime")
                                      for n in (1, 4)}
    aps = {key(r): r["AP"] for r in rows}
    assert all(r["status"] == "ok" and r["images"] == 8 for r in rows)
    assert aps["torch_cpu_fp32_b1"] > 0.3  # the fixture detects the shapes
    assert max(aps.values()) - min(aps.values()) < 0.01, aps


def test_inference_slowed_inside_the_pass_is_said():
    from harness.report.coco_report import SLOWED_RATIO, _slowed

    assert _slowed(1.72) == ("; its inference took 1.72× its time alone (the host's reading "
                             "and post-processing beside it)")
    assert _slowed(SLOWED_RATIO) == _slowed(1.0) == _slowed(None) == ""


def test_a_host_bound_pass_says_which_side_held_inference_up():
    from harness.report.coco_report import _binding

    assert _binding({"waited_for_reading_s": 0.3, "waited_for_post_s": 0.01}) == \
        "; inference waited 0.31 s, mostly for reading + preprocessing"
    assert "mostly for post-processing + writing" in \
        _binding({"waited_for_reading_s": 0.0, "waited_for_post_s": 0.2})
    assert _binding({}) == "" and \
        _binding({"waited_for_reading_s": 0.0, "waited_for_post_s": 0.0}) == ""
    # where the time outside inference went: the pass's start and end, the rest between calls
    said = _binding({"wall_s": 0.2, "inference_s": 0.18, "waited_for_reading_s": 0.0,
                     "waited_for_post_s": 0.001, "fill_s": 0.004, "drain_s": 0.009})
    assert said == ("; inference waited 0.001 s, mostly for post-processing + writing; of its "
                    "0.02 s outside inference 0.004 s came before the first call and 0.009 s "
                    "after the last (once per pass: less of a longer one), 0.007 s between "
                    "calls"), said
