"""harness/gates/limits.py without pytest in the loop: reading the [gates] table, the checks
each gate makes of a results document, and where the gates and numbers come from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.gates.limits import GATES, evaluate, parse_gates, plan_gates
from harness.results import Results, read_results


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def checks_of(results_doc, baseline_doc, tmp_path, gates=None):
    """Every check of `gates` (default the document's own) with the baseline in place."""
    write_json(tmp_path / "reports/baseline/results.json", baseline_doc)
    table = gates if gates is not None else results_doc["experiment"]["gates"]
    return evaluate(parse_gates(table, "test"), Results.from_json(results_doc),
                    "reports/demo/results.json", tmp_path)


def by_name(checks):
    return {c.test_name: c for c in checks}


# -- the [gates] table

def test_scalar_applies_to_every_precision_and_a_table_only_to_its_own():
    scalar, table = parse_gates({"min_match_rate": 0.9, "max_delta_ap": {"fp16": 0.02}}, "t")
    assert [scalar.limit_for(p) for p in ("fp32", "fp16", "int8")] == [0.9, 0.9, 0.9]
    assert [table.limit_for(p) for p in ("fp32", "fp16", "int8")] == [None, 0.02, None]


def test_unknown_gate_names_the_known_ones():
    with pytest.raises(UserError, match="unknown gate 'max_ap_drop'") as err:
        parse_gates({"max_ap_drop": 0.1}, "experiments/x.toml")
    assert "experiments/x.toml" in str(err.value)
    assert all(name in str(err.value) for name in GATES)


@pytest.mark.parametrize("table, message", [
    ({"max_delta_ap": {"fp8": 0.1}}, "unknown precision 'fp8'"),
    ({"max_delta_ap": {"fp16": "0.1"}}, "limit for fp16 must be a number"),
    ({"max_unexplained": True}, "must be a number or a table"),
    ({"max_latency_ratio": 1.2}, "must be a table { baseline"),
    ({"max_latency_ratio": {"baseline": "b.json"}}, "must be a table { baseline"),
    ({}, "no gates"),
])
def test_malformed_tables_say_what_is_wrong(table, message):
    with pytest.raises(UserError, match=message.replace("{", r"\{")):
        parse_gates(table, "t")


# -- checks against the numbers

def test_passing_document_passes_every_check(results_doc, baseline_doc, tmp_path,
                                             passing_outcomes):
    checks = checks_of(results_doc, baseline_doc, tmp_path)
    for gate, (passed, skipped) in passing_outcomes.items():
        mine = [c for c in checks if c.gate == gate]
        assert sum(1 for c in mine if c) == passed, gate
        assert sum(1 for c in mine if c.skipped) == skipped, gate
        assert len(mine) == passed + skipped, gate


def test_ids_name_the_configuration(results_doc, baseline_doc, tmp_path):
    names = by_name(checks_of(results_doc, baseline_doc, tmp_path))
    assert "max_delta_ap[onnxruntime-cpu-fp16-b4]" in names
    assert "max_layer_rel_l2[model_fp16.onnx]" in names
    assert "max_latency_ratio[torch-cpu-fp32-b1]" in names
    # the PyTorch fp32 rows are the reference: their ΔAP is 0 by definition
    assert not any(n.startswith("max_delta_ap[torch-cpu-fp32") for n in names)


def test_delta_ap_is_checked_both_ways(results_doc, baseline_doc, tmp_path):
    results_doc["coco"]["rows"][2]["delta_AP"] = +0.03  # fp16 above PyTorch by more than 0.02
    check = by_name(checks_of(results_doc, baseline_doc, tmp_path))[
        "max_delta_ap[onnxruntime-cpu-fp16-b4]"]
    assert not check and check.value == pytest.approx(0.03) and check.limit == 0.02
    assert "ΔAP +0.03 vs PyTorch fp32" in check.failure_message()


def test_worst_layer_and_first_divergence_are_named(results_doc, baseline_doc, tmp_path):
    fp16 = results_doc["compare"]["targets"][1]
    fp16["layers"]["rows"][0]["rel_l2"] = 0.5
    fp16["layers"]["first_divergence"] = {"module": "backbone.stage0", "rel_l2": 0.5,
                                          "tolerance": 1e-4}
    check = by_name(checks_of(results_doc, baseline_doc, tmp_path))[
        "max_layer_rel_l2[model_fp16.onnx]"]
    assert not check and check.value == 0.5 and check.limit == 0.02
    message = check.failure_message()
    assert "worst layer: backbone.stage0 (/backbone/stage0/Conv_output_0)" in message
    assert "numbers start to differ (rel-L2 > 0.0001) at backbone.stage0" in message
    assert "open: reports/demo/compare.md" in message


def test_unexplained_message_lists_examples(results_doc, baseline_doc, tmp_path):
    det = results_doc["compare"]["targets"][0]["detections"]
    det.update(unexplained=2, mismatches=3, causes={"drift": 1, "unexplained": 2})
    det["examples"] = [{"image": "b.jpg", "cause": "unexplained", "side": "target",
                        "class": "disc", "score": 0.41, "detail": "no trace explains it"}]
    check = by_name(checks_of(results_doc, baseline_doc, tmp_path))[
        "max_unexplained[model_fp32.onnx]"]
    assert not check
    message = check.failure_message()
    assert "unexplained detection mismatches = 2 > limit 0" in message
    assert "3 mismatches (drift 1, unexplained 2)" in message
    assert "b.jpg: target disc score 0.41 no trace explains it" in message


def test_null_or_missing_numbers_fail_naming_the_field(results_doc, baseline_doc, tmp_path):
    """A value the gate needs that the results lack fails the gate (a renamed key must not
    turn a failing CI green); the message names the field."""
    results_doc["coco"]["rows"][3]["delta_AP"] = None
    results_doc["compare"]["targets"][2]["detections"]["match_rate"] = None
    del results_doc["compare"]["targets"][1]["detections"]["unexplained"]
    names = by_name(checks_of(results_doc, baseline_doc, tmp_path))
    for name, field in [("max_delta_ap[onnxruntime-cpu-int8-b4]", "coco.rows[3].delta_AP"),
                        ("min_match_rate[model_int8.onnx]",
                         "compare.targets[2].detections.match_rate"),
                        ("max_unexplained[model_fp16.onnx]",
                         "compare.targets[1].detections.unexplained")]:
        check = names[name]
        assert not check and check.skipped is None and field in check.error, name
        assert field in check.failure_message()
    assert "no PyTorch fp32 row" in names["max_delta_ap[onnxruntime-cpu-int8-b4]"].error
    assert "is missing" in names["max_unexplained[model_fp16.onnx]"].error


def test_a_gate_that_matches_nothing_fails(results_doc, baseline_doc, tmp_path):
    del results_doc["compare"]
    checks = checks_of(results_doc, baseline_doc, tmp_path,
                       gates={"max_unexplained": 0, "min_ap": {"int8": 0.1, "fp16": 0.1}})
    names = by_name(checks)
    assert len(checks) == 4  # the one compare gate, and three fp16/int8 coco rows
    missing = names["max_unexplained[no-targets]"]
    assert not missing and missing.skipped is None
    assert "run `harness compare`" in missing.error
    results_doc["coco"]["rows"] = results_doc["coco"]["rows"][:1]  # only the reference
    only = checks_of(results_doc, baseline_doc, tmp_path, gates={"max_delta_ap": 0.1})
    assert [c.test_name for c in only] == ["max_delta_ap[no-rows]"]
    assert not only[0] and "besides the PyTorch fp32 reference" in only[0].error


def test_repeated_configurations_get_distinct_ids(results_doc, baseline_doc, tmp_path):
    results_doc["compare"]["targets"].append(results_doc["compare"]["targets"][0])
    names = [c.test_name for c in checks_of(results_doc, baseline_doc, tmp_path,
                                            gates={"min_match_rate": 0.9})]
    assert names.count("min_match_rate[model_fp32.onnx]") == 1
    assert "min_match_rate[model_fp32.onnx-2]" in names


def test_latency_ratio_against_the_same_row_of_the_baseline(results_doc, baseline_doc,
                                                            tmp_path):
    results_doc["coco"]["rows"][1]["latency_ms"]["total"]["mean"] = 54.0  # 2x its baseline
    del baseline_doc["coco"]["rows"][2]  # no onnxruntime fp16 b4 in the baseline
    names = by_name(checks_of(results_doc, baseline_doc, tmp_path))
    check = names["max_latency_ratio[onnxruntime-cpu-fp32-b1]"]
    assert not check and check.value == pytest.approx(2.0) and check.limit == 1.2
    assert "54 ms vs 27 ms in the baseline reports/baseline/results.json" in \
        check.failure_message()
    assert names["max_latency_ratio[torch-cpu-fp32-b1]"]
    missing = names["max_latency_ratio[onnxruntime-cpu-fp16-b4]"]
    assert not missing and "coco row onnxruntime-cpu-fp16-b4 is missing" in missing.error


def test_missing_baseline_is_a_user_error(results_doc, tmp_path):
    with pytest.raises(UserError, match="max_latency_ratio baseline: results file .* does "
                                        "not exist"):
        evaluate(parse_gates(results_doc["experiment"]["gates"], "t"),
                 Results.from_json(results_doc), "r.json", tmp_path)


# -- where the gates and the numbers come from

def test_results_file_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_results(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_results(tmp_path / "bad.json")
    write_json(tmp_path / "other.json", [1, 2])
    with pytest.raises(UserError, match="not a harness results document"):
        read_results(tmp_path / "other.json")
    write_json(tmp_path / "old.json", {"schema": 1})
    with pytest.raises(UserError, match="has schema 1; this harness reads schema 2: run the "
                                        "command again"):
        read_results(tmp_path / "old.json")


def test_gates_from_the_results_file_alone(results_doc, baseline_doc, tmp_path,
                                          passing_outcomes):
    write_json(tmp_path / "reports/demo/results.json", results_doc)
    write_json(tmp_path / "reports/baseline/results.json", baseline_doc)
    plan = plan_gates("reports/demo", None, tmp_path)  # a report folder works too
    assert plan.results_spelled == "reports/demo/results.json"
    assert plan.results_path == tmp_path / "reports/demo/results.json"
    assert plan.gates_source == "reports/demo/results.json (experiment.gates)"
    assert len(plan.checks) == sum(p + s for p, s in passing_outcomes.values())
    del results_doc["experiment"]
    write_json(tmp_path / "reports/demo/results.json", results_doc)
    with pytest.raises(UserError, match="names no gates .* --harness-experiment"):
        plan_gates("reports/demo/results.json", None, tmp_path)


def test_experiment_gives_the_gates_and_the_default_results(results_doc, baseline_doc,
                                                            tmp_path):
    write_json(tmp_path / "reports/demo/results.json", results_doc)
    write_json(tmp_path / "elsewhere/results.json", results_doc)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments/x.toml").write_text(
        'name = "demo"\n[gates]\nmin_ap = 0.6\n')  # stricter than the copy in results.json
    for results, experiment, expected in [
            (None, "experiments/x.toml", "reports/demo/results.json"),
            ("experiments/x.toml", None, "reports/demo/results.json"),
            ("elsewhere/results.json", "experiments/x.toml", "elsewhere/results.json")]:
        plan = plan_gates(results, experiment, tmp_path)
        assert plan.results_spelled == expected
        assert plan.gates_source == "experiments/x.toml"
        assert {c.gate for c in plan.checks} == {"min_ap"}
        assert sum(1 for c in plan.checks if not c and not c.skipped) == 4  # AP < 0.6


def test_experiment_file_problems(tmp_path):
    with pytest.raises(UserError, match="name the results .* or the experiment"):
        plan_gates(None, None, tmp_path)
    (tmp_path / "no_gates.toml").write_text('name = "demo"\n')
    with pytest.raises(UserError, match="has no \\[gates\\] table"):
        plan_gates(None, "no_gates.toml", tmp_path)
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(UserError, match="is not valid TOML"):
        plan_gates(None, "broken.toml", tmp_path)
    with pytest.raises(UserError, match="experiment file not found"):
        plan_gates(None, "missing.toml", tmp_path)
    (tmp_path / "unnamed.toml").write_text("[gates]\nmin_ap = 0.5\n")
    with pytest.raises(UserError, match="results file .*reports/unnamed/results.json does "
                                        "not exist"):
        plan_gates(None, "unnamed.toml", tmp_path)  # name defaults to the file stem
