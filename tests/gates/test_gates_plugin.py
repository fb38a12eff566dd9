"""The gates as pytest runs them (pytester, in-process unless said): one test per gate and
configuration, failures that show value, limit, configuration and report, skips with their
reason, usage errors for bad input, and nothing at all when the options are not given."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

RESULTS = "reports/demo/results.json"
NO_CACHE = ("-p", "no:cacheprovider")


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def reports(pytester, results_doc, baseline_doc):
    """Writes the results (default: the passing document) and its baseline into the pytester
    folder; returns the writer so a test can write a broken document instead."""
    write_json(pytester.path / "reports/baseline/results.json", baseline_doc)

    def write(doc=results_doc) -> Path:
        return write_json(pytester.path / RESULTS, doc)

    write()
    return write


def run_gates(pytester, *args):
    return pytester.runpytest(*NO_CACHE, "-ra", "--harness-results", RESULTS, *args)


def test_passing_results_pass_every_gate(pytester, reports, passing_outcomes):
    result = run_gates(pytester, "-v")
    passed = sum(p for p, _ in passing_outcomes.values())
    skipped = sum(s for _, s in passing_outcomes.values())
    result.assert_outcomes(passed=passed, skipped=skipped)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([
        f"harness gates: {passed + skipped} checks of {RESULTS}, gates from {RESULTS} "
        "(experiment.gates)",
        f"{RESULTS}::max_delta_ap[[]onnxruntime-cpu-fp16-b4[]] PASSED*",
        f"{RESULTS}::max_layer_rel_l2[[]model_fp16.onnx[]] PASSED*",
    ])


# gate → (how to break the passing document, the failing test, lines of its message)
BREAKS = {
    "max_delta_ap": (
        lambda d: d["coco"]["rows"][3].update(delta_AP=-0.12, AP=0.43),
        "max_delta_ap[onnxruntime-cpu-int8-b4]",
        ["max_delta_ap[[]onnxruntime-cpu-int8-b4[]]: |ΔAP vs PyTorch fp32| = 0.12 > limit 0.1",
         "configuration: backend onnxruntime, device cpu, precision int8, batch 4",
         "AP 0.43, ΔAP -0.12 vs PyTorch fp32",
         "open: reports/demo/coco.md"]),
    "min_ap": (
        lambda d: d["coco"]["rows"][1].update(AP=0.45),
        "min_ap[onnxruntime-cpu-fp32-b1]",
        ["min_ap[[]onnxruntime-cpu-fp32-b1[]]: AP = 0.45 < limit 0.5",
         "configuration: backend onnxruntime, device cpu, precision fp32, batch 1",
         "open: reports/demo/coco.md"]),
    "max_layer_rel_l2": (
        lambda d: d["compare"]["targets"][0]["layers"]["rows"][1].update(rel_l2=0.003),
        "max_layer_rel_l2[model_fp32.onnx]",
        ["max_layer_rel_l2[[]model_fp32.onnx[]]: worst layer rel-L2 = 0.003 > limit 0.0001",
         "configuration: reports/demo/model_fp32.onnx, kind onnx, precision fp32, variant raw",
         "worst layer: backbone.stage1 (/backbone/stage1/Conv_output_0)",
         "open: reports/demo/compare.md"]),
    "min_match_rate": (
        lambda d: d["compare"]["targets"][2]["detections"].update(match_rate=0.9,
                                                                  matched=180),
        "min_match_rate[model_int8.onnx]",
        ["min_match_rate[[]model_int8.onnx[]]: post-NMS match rate = 0.9 < limit 0.95",
         "configuration: reports/demo/model_int8.onnx, kind onnx, precision int8, variant raw",
         "matched 180 of 200 reference detections (200 from the target)",
         "open: reports/demo/compare.md"]),
    "max_unexplained": (
        lambda d: d["compare"]["targets"][1]["detections"].update(
            unexplained=3, mismatches=3, causes={"unexplained": 3}),
        "max_unexplained[model_fp16.onnx]",
        ["max_unexplained[[]model_fp16.onnx[]]: unexplained detection mismatches = 3 > limit 0",
         "configuration: reports/demo/model_fp16.onnx, kind onnx, precision fp16, variant raw",
         "3 mismatches (unexplained 3)",
         "open: reports/demo/compare.md"]),
    "max_latency_ratio": (
        lambda d: d["coco"]["rows"][2]["latency_ms"]["total"].update(mean=44.55),
        "max_latency_ratio[onnxruntime-cpu-fp16-b4]",
        ["max_latency_ratio[[]onnxruntime-cpu-fp16-b4[]]: latency ratio to baseline = 1.5 > "
         "limit 1.2",
         "configuration: backend onnxruntime, device cpu, precision fp16, batch 4",
         "total latency 44.55 ms vs 29.7 ms in the baseline reports/baseline/results.json "
         "(open reports/baseline/coco.md)",
         "open: reports/demo/coco.md"]),
}


@pytest.mark.parametrize("gate", list(BREAKS))
def test_a_broken_limit_fails_its_one_test_with_the_numbers(pytester, reports, results_doc,
                                                            passing_outcomes, gate):
    breaks, failing, message = BREAKS[gate]
    breaks(results_doc)
    reports(results_doc)
    result = run_gates(pytester)
    passed = sum(p for p, _ in passing_outcomes.values())
    skipped = sum(s for _, s in passing_outcomes.values())
    result.assert_outcomes(passed=passed - 1, failed=1, skipped=skipped)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    escaped = "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in failing)
    result.stdout.fnmatch_lines([f"_* {escaped} _*", *message,
                                 f"FAILED {RESULTS}::{escaped}*"], consecutive=False)


def test_every_gate_broken_at_once(pytester, reports, results_doc):
    for breaks, _, _ in BREAKS.values():
        breaks(results_doc)
    reports(results_doc)
    result = run_gates(pytester)
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == len(BREAKS)
    failed = [line.split("::")[1].split(" ")[0] for line in result.stdout.lines
              if line.startswith("FAILED ")]
    assert sorted(failed) == sorted(failing for _, failing, _ in BREAKS.values())


def test_unavailable_configurations_are_skipped_with_their_reason(pytester, reports):
    result = run_gates(pytester)
    result.stdout.fnmatch_lines([
        f"SKIPPED [[]1[]] {RESULTS}*: max_delta_ap[[]tensorrt-cuda-fp16-b1[]]: "
        "not available: tensorrt is not installed",
        f"SKIPPED [[]1[]] {RESULTS}*: max_layer_rel_l2[[]model_fp16.engine[]]: "
        "not available: tensorrt is not installed",
    ], consecutive=False)


def test_a_gate_with_nothing_to_check_is_one_failed_test(pytester, reports, results_doc):
    """No compare section for a compare gate: a failure naming what is missing, not a skip
    that would keep CI green."""
    del results_doc["compare"]
    results_doc["experiment"]["gates"] = {"max_unexplained": 0, "min_ap": 0.5}
    reports(results_doc)
    result = run_gates(pytester)
    result.assert_outcomes(passed=4, skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*max_unexplained[[]no-targets[]]: cannot be checked: the "
                                 "results have no 'compare' section (run `harness compare`*"])


def test_scalar_limit_gates_every_precision_a_table_only_its_own(pytester, reports,
                                                                 results_doc):
    results_doc["experiment"]["gates"] = {"max_layer_rel_l2": 1e-4}  # fp16 and int8 too
    reports(results_doc)
    result = run_gates(pytester)
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    result.stdout.fnmatch_lines(["FAILED *::max_layer_rel_l2[[]model_fp16.onnx[]]*",
                                 "FAILED *::max_layer_rel_l2[[]model_int8.onnx[]]*"])
    results_doc["experiment"]["gates"] = {"max_layer_rel_l2": {"fp16": 1e-4}}
    reports(results_doc)
    result = run_gates(pytester, "--collect-only", "-q")
    assert [line for line in result.stdout.lines if "::" in line] == [
        f"{RESULTS}::max_layer_rel_l2[model_fp16.onnx]",
        f"{RESULTS}::max_layer_rel_l2[model_fp16.engine]"]


def test_experiment_file_gives_gates_and_default_results(pytester, reports, gates_toml):
    stricter = gates_toml.replace("min_match_rate = 0.95", "min_match_rate = 0.999")
    assert stricter != gates_toml
    pytester.makefile(".toml", **{"experiments/demo": f'name = "demo"\n[gates]\n{stricter}'})
    result = pytester.runpytest(*NO_CACHE, "--harness-experiment", "experiments/demo.toml")
    result.assert_outcomes(passed=15, failed=2, skipped=5)  # fp16 0.99, int8 0.97 < 0.999
    result.stdout.fnmatch_lines([f"harness gates: 22 checks of {RESULTS}, gates from "
                                 "experiments/demo.toml",
                                 "*min_match_rate[[]model_fp16.onnx[]]: post-NMS match rate = "
                                 "0.99 < limit 0.999"])
    # both options: the gates from the experiment, the numbers from the results file
    write_json(pytester.path / "elsewhere/results.json",
               json.loads((pytester.path / RESULTS).read_text()))
    result = pytester.runpytest(*NO_CACHE, "--harness-experiment", "experiments/demo.toml",
                                "--harness-results", "elsewhere/results.json")
    result.assert_outcomes(passed=15, failed=2, skipped=5)
    result.stdout.fnmatch_lines(["open: elsewhere/compare.md"], consecutive=False)


def test_shipped_experiment_by_its_harness_name(pytester, reports):
    # `harness demo`'s experiment ships inside the package; `harness:` names it from any folder
    result = pytester.runpytest(*NO_CACHE, "--collect-only",
                                "--harness-experiment", "harness:experiments/demo.toml")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([f"harness gates: * checks of {RESULTS}, gates from "
                                 "harness:experiments/demo.toml",
                                 "*max_delta_ap[[]onnxruntime-cpu-int8-b4[]]*"])
    result = pytester.runpytest(*NO_CACHE, "--harness-experiment", "harness:experiments/no.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: harness gates: harness:experiments/no.toml not found "
                                 "in the harness package (it ships *"])


def test_runs_from_another_directory(pytester, reports, baseline_doc, monkeypatch):
    elsewhere = pytester.mkdir("ci-job")
    monkeypatch.chdir(elsewhere)
    args = (*NO_CACHE, "--harness-results", f"../{RESULTS}", "--collect-only", "-q")
    # the baseline path is relative to where pytest starts: from here it is missing
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: harness gates: max_latency_ratio baseline: results "
                                 "file */ci-job/reports/baseline/results.json does not exist*"])
    write_json(elsewhere / "reports/baseline/results.json", baseline_doc)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.OK
    ids = [line for line in result.stdout.lines if "::" in line]
    assert len(ids) == 22
    assert all(line.endswith(("]",)) and f"{RESULTS}::" in line for line in ids)
    assert any(line.endswith("::min_ap[onnxruntime-cpu-fp32-b1]") for line in ids)


def test_real_command_line_from_another_directory(pytester, reports, results_doc,
                                                  baseline_doc, tmp_path, monkeypatch):
    """A separate python process, as CI runs it: the entry point loads the plugin, and the
    results file lies outside the directory pytest starts in."""
    BREAKS["min_ap"][0](results_doc)
    results = reports(results_doc)
    runner = tmp_path / "runner"
    write_json(runner / "reports/baseline/results.json", baseline_doc)
    monkeypatch.chdir(runner)
    result = pytester.runpytest_subprocess(*NO_CACHE, "--harness-results", str(results))
    result.assert_outcomes(passed=16, failed=1, skipped=5)
    result.stdout.fnmatch_lines(["min_ap[[]onnxruntime-cpu-fp32-b1[]]: AP = 0.45 < limit 0.5",
                                 "configuration: *",
                                 f"open: {results.parent / 'coco.md'}"], consecutive=False)


def test_gates_run_alongside_given_test_paths(pytester, reports):
    pytester.makepyfile(test_mine="def test_one():\n    assert 1 + 1 == 2\n")
    result = run_gates(pytester, "test_mine.py")
    result.assert_outcomes(passed=18, skipped=5)
    result.stdout.fnmatch_lines(["test_mine.py .*", f"{RESULTS} *"])
    # the results file also lies under "." : still collected once
    result = run_gates(pytester, ".")
    result.assert_outcomes(passed=18, skipped=5)


def test_without_the_options_the_plugin_does_nothing(pytester, reports):
    pytester.makepyfile(test_mine="def test_one():\n    assert True\n")
    result = pytester.runpytest(*NO_CACHE, "-v")
    result.assert_outcomes(passed=1)
    assert "harness gates" not in result.stdout.str()
    assert not any("results.json" in line for line in result.stdout.lines)


@pytest.mark.parametrize("content, message", [
    (None, "ERROR: harness gates: results file */reports/demo/results.json does not exist*"),
    ("{truncated", "ERROR: harness gates: results file * is not valid JSON*"),
    ({"schema": 2, "experiment": {"name": "demo", "path": "e.toml",
                                  "gates": {"max_ap_drop": 0.1}}},
     "ERROR: harness gates: reports/demo/results.json (experiment.gates): unknown gate "
     "'max_ap_drop'; known gates: max_delta_ap, min_ap, max_layer_rel_l2, min_match_rate, "
     "max_unexplained, max_latency_ratio, max_batch_variant"),
    ({"schema": 2, "coco": {"rows": []}},
     "ERROR: harness gates: results file reports/demo/results.json names no gates*"),
])
def test_bad_input_is_a_one_line_usage_error(pytester, content, message):
    if isinstance(content, str):
        (pytester.path / "reports/demo").mkdir(parents=True)
        (pytester.path / RESULTS).write_text(content)
    elif content is not None:
        write_json(pytester.path / RESULTS, content)
    result = run_gates(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert not any(line.startswith("Traceback") for line in result.stderr.lines)
