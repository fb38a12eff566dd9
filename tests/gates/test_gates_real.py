"""The gates on the results.json of a real `harness compare` and a real `harness coco` run
(not a hand-written document): every gate kind passes on it, and deleting the field a gate
reads makes that gate fail with the field named — never a skip."""
from __future__ import annotations

import copy
import json

import pytest

from harness.cli import main
from harness.gates.limits import evaluate, parse_gates
from harness.models.zoo import FIXTURE_CHECKPOINT, FIXTURE_CONFIG
from harness.results import Results

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """(results.json as a dict, its gates) after compare and coco into one folder."""
    from harness.synth import generate_synthetic_coco

    tmp = tmp_path_factory.mktemp("gates_real")
    generate_synthetic_coco(tmp / "data", images=8, seed=3, val_fraction=0.5)
    out = tmp / "report"
    gates = {"max_delta_ap": 0.05, "min_ap": 0.1, "max_layer_rel_l2": 1e-4,
             "min_match_rate": 0.95, "max_unexplained": 0,
             "max_latency_ratio": {"baseline": str(out / "results.json"), "limit": 1.0}}
    exp = tmp / "real.toml"
    exp.write_text(f"""
name = "real"
[model]
config = "{FIXTURE_CONFIG}"
checkpoint = "{FIXTURE_CHECKPOINT}"
[data]
images = "{tmp / 'data' / 'val2017'}"
[matrix]
backends = ["torch", "onnxruntime"]
precisions = ["fp32"]
batches = [2]
devices = ["cpu"]
[latency]
warmup = 0
runs = 2
[compare]
count = 2
batch = 2
layers = ["backbone.stem", "neck.*"]
[gates]
max_delta_ap = 0.05
min_ap = 0.1
max_layer_rel_l2 = 1e-4
min_match_rate = 0.95
max_unexplained = 0
max_latency_ratio = {{ baseline = "{out / 'results.json'}", limit = 1.0 }}
""")
    assert main(["compare", "--experiment", str(exp), "--out", str(out)]) == 0
    assert main(["coco", "--experiment", str(exp), "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "results.json").read_text()), gates, out


def _checks(doc, gates, out):
    return {c.test_name: c for c in evaluate(parse_gates(gates, "real.toml"),
                                             Results.from_json(doc),
                                             str(out / "results.json"), out)}


def test_every_gate_kind_passes_on_a_real_run(real_run):
    doc, gates, out = real_run
    checks = _checks(doc, gates, out)
    assert {c.gate for c in checks.values()} == set(gates)
    failed = [c.failure_message() for c in checks.values() if not c]
    assert not failed, failed
    assert not any(c.skipped for c in checks.values())


# the field each gate reads, as a path into results.json, and the check it belongs to
FIELDS = [
    ("max_delta_ap", ("coco", "rows", 1, "delta_AP"), "max_delta_ap[onnxruntime-cpu-fp32-b2]"),
    ("min_ap", ("coco", "rows", 0, "AP"), "min_ap[torch-cpu-fp32-b2]"),
    ("max_layer_rel_l2", ("compare", "targets", 0, "layers"), None),
    ("max_layer_rel_l2", ("compare", "targets", 0, "layers", "rows", 0, "rel_l2"), None),
    ("min_match_rate", ("compare", "targets", 0, "detections", "match_rate"), None),
    ("max_unexplained", ("compare", "targets", 0, "detections", "unexplained"), None),
    ("max_latency_ratio", ("coco", "rows", 1, "latency_ms"),
     "max_latency_ratio[onnxruntime-cpu-fp32-b2]"),
]


@pytest.mark.parametrize("gate, path, name", FIELDS,
                         ids=[".".join(map(str, p)) for _, p, _ in FIELDS])
def test_deleting_the_field_a_gate_reads_fails_it_naming_the_field(real_run, gate, path,
                                                                   name):
    doc, gates, out = real_run
    broken = copy.deepcopy(doc)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    checks = _checks(broken, {gate: gates[gate]}, out)
    if name is None:  # the compare target is named after its file
        (name,) = [n for n in checks if n.startswith(gate)]
    check = checks[name]
    field = ".".join(f"[{k}]" if isinstance(k, int) else k for k in path).replace(".[", "[")
    assert not check and check.skipped is None
    assert field in check.failure_message(), check.failure_message()
