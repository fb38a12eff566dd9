"""Results documents for the gate tests: one that passes every gate of GATES_TOML, and its
latency baseline, written by hand so each test can break one number at a time (the gates
are also run on the real results.json of real compare and coco runs: test_gates_real.py)."""
from __future__ import annotations

import copy
from typing import Any

import pytest

# The gates the passing document meets; the baseline path is relative to the directory pytest
# starts in (the pytester folder).
GATES_TOML = """\
max_delta_ap = { fp16 = 0.02, int8 = 0.10 }
min_ap = { fp32 = 0.5 }
max_layer_rel_l2 = { fp32 = 1e-4, fp16 = 2e-2, int8 = 0.2 }
min_match_rate = 0.95
max_unexplained = 0
max_latency_ratio = { baseline = "reports/baseline/results.json", limit = 1.2 }
"""

GATES = {
    "max_delta_ap": {"fp16": 0.02, "int8": 0.10},
    "min_ap": {"fp32": 0.5},
    "max_layer_rel_l2": {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.2},
    "min_match_rate": 0.95,
    "max_unexplained": 0,
    "max_latency_ratio": {"baseline": "reports/baseline/results.json", "limit": 1.2},
}

TRT_MISSING = "not available: tensorrt is not installed"


def coco_row(backend: str, device: str, precision: str, batch: int, ap: float,
             delta_ap: float, total_ms: float) -> dict[str, Any]:
    return {"backend": backend, "device": device, "precision": precision, "batch": batch,
            "status": "ok", "AP": ap, "AP50": ap + 0.25, "delta_AP": delta_ap,
            "latency_ms": {"total": {"mean": total_ms, "median": total_ms}},
            "images": 60, "unreadable": 0}


def unavailable_row(backend: str, device: str, precision: str, batch: int) -> dict[str, Any]:
    return {"backend": backend, "device": device, "precision": precision, "batch": batch,
            "status": TRT_MISSING, "AP": None, "delta_AP": None, "latency_ms": None}


def target(name: str, precision: str, rel_l2s: list[float], match_rate: float = 1.0,
           unexplained: int = 0) -> dict[str, Any]:
    rows = [{"module": f"backbone.stage{i}", "tensor": f"/backbone/stage{i}/Conv_output_0",
             "depth": i, "rel_l2": v, "cosine": 1.0, "max_abs": v, "mean_abs": v}
            for i, v in enumerate(rel_l2s)]
    return {"name": name, "path": f"reports/demo/{name}", "kind": "onnx", "available": True,
            "reason": None, "precision": precision, "variant": "raw", "pipeline": None,
            "layers": {"tolerance": 1e-4, "metric": "rel_l2", "rows": rows,
                       "first_divergence": None},
            "detections": {"reference": 200, "target": 200, "matched": int(200 * match_rate),
                           "match_rate": match_rate, "mismatches": unexplained,
                           "unexplained": unexplained,
                           "causes": {"topk_cut": 0, "drift": 0, "unexplained": unexplained},
                           "examples": []}}


def passing_results() -> dict[str, Any]:
    return {
        "schema": 2,
        "experiment": {"name": "demo", "path": "experiments/demo.toml", "gates": GATES},
        "compare": {"targets": [
            target("model_fp32.onnx", "fp32", [1e-7, 3e-5]),
            target("model_fp16.onnx", "fp16", [2e-4, 5e-3], match_rate=0.99),
            target("model_int8.onnx", "int8", [0.02, 0.08], match_rate=0.97),
            {"name": "model_fp16.engine", "path": "reports/demo/model_fp16.engine",
             "kind": "engine", "available": False, "reason": TRT_MISSING,
             "precision": "fp16", "layers": None, "detections": None},
        ]},
        "coco": {"rows": [
            coco_row("torch", "cpu", "fp32", 1, 0.550, 0.0, 40.0),
            coco_row("onnxruntime", "cpu", "fp32", 1, 0.549, -0.001, 30.0),
            coco_row("onnxruntime", "cpu", "fp16", 4, 0.540, -0.010, 33.0),
            coco_row("onnxruntime", "cpu", "int8", 4, 0.500, -0.050, 20.0),
            unavailable_row("tensorrt", "cuda", "fp16", 1),
        ]},
    }


def baseline_results() -> dict[str, Any]:
    doc = copy.deepcopy(passing_results())
    for row in doc["coco"]["rows"]:
        if row["status"] == "ok":
            row["latency_ms"]["total"]["mean"] *= 0.9  # this run is 1.11x the baseline
    del doc["compare"]
    return doc


# outcomes of passing_results() under GATES: per gate (passed, skipped)
PASSING_OUTCOMES = {
    "max_delta_ap": (2, 1),      # ort fp16, ort int8; tensorrt fp16 unavailable
    "min_ap": (2, 0),            # the two fp32 rows
    "max_layer_rel_l2": (3, 1),  # three onnx targets; the engine unavailable
    "min_match_rate": (3, 1),
    "max_unexplained": (3, 1),
    "max_latency_ratio": (4, 1),
}


@pytest.fixture
def results_doc() -> dict[str, Any]:
    """A fresh copy of the passing results document, for a test to break."""
    return passing_results()


@pytest.fixture
def baseline_doc() -> dict[str, Any]:
    return baseline_results()


@pytest.fixture
def gates_toml() -> str:
    """GATES as the body of an experiment's [gates] table."""
    return GATES_TOML


@pytest.fixture
def passing_outcomes() -> dict[str, tuple[int, int]]:
    return dict(PASSING_OUTCOMES)
