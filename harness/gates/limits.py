"""Regression gates as plain data and functions: read a `[gates]` table (from an experiment file
or from `results.json`'s `experiment.gates`), and turn every limit into one `GateCheck` per
configuration it applies to. No pytest here; harness/gates/plugin.py makes one test per check.

The table (TOML; docs/gates.md has the full description)::

    [gates]
    max_delta_ap = { fp16 = 0.02, int8 = 0.10 }   # |ΔAP vs PyTorch fp32|, per coco row
    min_ap = { fp32 = 0.5 }                        # AP floor, per coco row
    max_layer_rel_l2 = { fp32 = 1e-4, fp16 = 2e-2, int8 = 0.2 }  # worst layer, per compare target
    min_match_rate = 0.95                          # detections.match_rate, per compare target
    max_unexplained = 0                            # detections.unexplained, per compare target
    max_latency_ratio = { baseline = "reports/baseline/results.json", limit = 1.2 }
                                                   # total latency / the baseline's same row
    max_batch_variant = 0                          # images changing alone vs in a batch,
                                                   # per compare target

A number applies to every precision; a table `{fp16 = ..., int8 = ...}` gates only the
precisions it names. Relative paths (the results file, the baseline) are relative to the
directory pytest was started from.

The numbers are read through harness.results. A value a gate needs that the results lack (a
missing or null field, a missing section, no configuration the gate applies to) FAILS the
gate with the field named — never a skip: a renamed key must not turn a failing CI green. A
skip is only for a row that itself says why it could not run (TensorRT not available here).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from harness.errors import UserError
from harness.experiment import PRECISION_NAMES as PRECISIONS
from harness.experiment import read_toml, resolve_path
from harness.gates.values import (
    GATES, GateSpec, _coco_id, _coco_words, _num, _target_id, _target_words,
)
from harness.results import RESULTS_NAME, Missing, Results, read_results

EVERY_PRECISION = "*"  # the key a scalar limit is stored under


@dataclass(frozen=True)
class Gate:
    """One entry of the `[gates]` table.

    limits: precision → limit; a scalar limit is stored under EVERY_PRECISION.
    baseline: the baseline results file as written in the table (max_latency_ratio only).
    """
    name: str
    limits: dict[str, float]
    baseline: Optional[str] = None

    def limit_for(self, precision: Optional[str]) -> Optional[float]:
        """The limit for a row of this precision; None where the gate does not apply."""
        if EVERY_PRECISION in self.limits:
            return self.limits[EVERY_PRECISION]
        return self.limits.get(precision or "")

    def precisions_text(self) -> str:
        if EVERY_PRECISION in self.limits:
            return "any precision"
        return "precision " + " or ".join(sorted(self.limits))


@dataclass(frozen=True)
class GateCheck:
    """One gate applied to one configuration: a coco row or a compare target.

    `bool(check)` is pass/fail; a check with `skipped` set was not evaluated because its row
    says it could not run (and why); one with `error` fails because the results lack what
    the gate needs (the message names the field).
    """
    gate: str
    configuration: str          # short id: "onnxruntime-cpu-fp16-b4", "model_fp16.onnx"
    described: str              # the configuration in words, for the failure message
    report: str                 # the report to open: compare.md / coco.md next to results.json
    value: Optional[float] = None
    limit: Optional[float] = None
    skipped: Optional[str] = None
    error: Optional[str] = None  # the results lack what the gate reads: a failure
    detail: str = ""            # what else helps: worst layer, unexplained examples, baseline

    @property
    def test_name(self) -> str:
        return f"{self.gate}[{self.configuration}]"

    def __bool__(self) -> bool:
        if self.skipped is not None or self.value is None or self.limit is None:
            return False
        if GATES[self.gate].bound == "max":
            return self.value <= self.limit
        return self.value >= self.limit

    def failure_message(self) -> str:
        if self.error is not None:
            return "\n".join([f"{self.test_name}: cannot be checked: {self.error}",
                              f"configuration: {self.described}",
                              "a gate whose value is missing fails: rerun the command that "
                              "writes it, or remove the gate", f"open: {self.report}"])
        spec = GATES[self.gate]
        op = ">" if spec.bound == "max" else "<"
        lines = [f"{self.test_name}: {spec.quantity} = {_num(self.value)} {op} limit "
                 f"{_num(self.limit)}",
                 f"configuration: {self.described}"]
        if self.detail:
            lines.append(self.detail)
        lines.append(f"open: {self.report}")
        return "\n".join(lines)

@dataclass(frozen=True)
class GatePlan:
    """What a gates run checks: the results file (absolute, and as the user spelled it), where
    the gates came from, and every check."""
    results_path: Path
    results_spelled: str
    gates_source: str
    checks: list[GateCheck]


def plan_gates(results: Optional[str], experiment: Optional[str],
               base_dir: Union[str, Path]) -> GatePlan:
    """Read the gates and the numbers they are checked against.

    results: --harness-results (a results.json, its report folder, or an experiment .toml);
    experiment: --harness-experiment. With an experiment the gates come from its [gates] table
    and the results default to reports/<name>/results.json; without one they come from the
    results file's experiment.gates. Relative paths start at base_dir; an experiment
    `harness:experiments/<name>.toml` is one shipped with harness (experiment.resolve_path).
    """
    base = Path(base_dir)
    if results is not None and experiment is None and results.endswith(".toml"):
        results, experiment = None, results
    table, source = None, ""
    if experiment is not None:
        name, table = read_experiment(resolve_path(experiment, base))
        if table is None:
            raise UserError(f"experiment file {experiment} has no [gates] table")
        source = experiment
        if results is None:
            results = str(Path("reports") / name / RESULTS_NAME)
    if results is None:
        raise UserError("name the results (--harness-results) or the experiment "
                        "(--harness-experiment) to gate")
    if (base / results).is_dir():
        results = str(Path(results) / RESULTS_NAME)
    doc = read_results(base / results)
    if table is None:
        table = doc.experiment.gates if doc.experiment is not None else None
        if table is None:
            raise UserError(f"results file {results} names no gates (no experiment.gates); "
                            "pass --harness-experiment experiments/<name>.toml")
        source = f"{results} (experiment.gates)"
    gates = parse_gates(table, source)
    checks = evaluate(gates, doc, results, base)
    return GatePlan(Path(os.path.abspath(base / results)), results, source, checks)


def read_experiment(path: Path) -> tuple[str, Optional[dict[str, Any]]]:
    """(name, [gates] table or None) of an experiment file; `name` defaults to the file stem."""
    doc = read_toml(path)
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise UserError(f"experiment file {path}: 'name' must be a non-empty string")
    return name, doc.get("gates")


def parse_gates(table: Any, source: str) -> list[Gate]:
    """The `[gates]` table → Gates, in table order. Unknown names and malformed limits are
    UserErrors that name `source` (where the table came from) and what is allowed."""
    if not isinstance(table, dict) or not table:
        raise UserError(f"{source}: no gates (an empty or missing [gates] table)")
    gates = []
    for name, value in table.items():
        if name not in GATES:
            raise UserError(f"{source}: unknown gate {name!r}; known gates: "
                            + ", ".join(GATES))
        where = f"{source}: gate {name}"
        if name == "max_latency_ratio":
            if not isinstance(value, dict) or set(value) != {"baseline", "limit"}:
                raise UserError(f"{where} must be a table {{ baseline = \"path/to/"
                                f"results.json\", limit = 1.2 }}, got {value!r}")
            if not isinstance(value["baseline"], str) or not value["baseline"]:
                raise UserError(f"{where}: baseline must be a path, got {value['baseline']!r}")
            gates.append(Gate(name, _parse_limit(value["limit"], where), value["baseline"]))
        else:
            gates.append(Gate(name, _parse_limit(value, where)))
    return gates


def _parse_limit(value: Any, where: str) -> dict[str, float]:
    if _is_number(value):
        return {EVERY_PRECISION: float(value)}
    if isinstance(value, dict) and value:
        unknown = [k for k in value if k not in PRECISIONS]
        if unknown:
            raise UserError(f"{where}: unknown precision {unknown[0]!r}; use "
                            + ", ".join(PRECISIONS))
        bad = [k for k, v in value.items() if not _is_number(v)]
        if bad:
            raise UserError(f"{where}: limit for {bad[0]} must be a number, "
                            f"got {value[bad[0]]!r}")
        return {k: float(v) for k, v in value.items()}
    raise UserError(f"{where}: the limit must be a number or a table of precision → number "
                    f"({{ {PRECISIONS[1]} = 0.02 }}), got {value!r}")


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


class Baselines:
    """Baseline results files, read once each; paths relative to `base_dir`."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self._docs: dict[str, Results] = {}

    def path(self, spelled: str) -> Path:
        return self.base_dir / spelled

    def read(self, spelled: str) -> Results:
        if spelled not in self._docs:
            try:
                self._docs[spelled] = read_results(self.path(spelled))
            except UserError as exc:
                raise UserError(f"max_latency_ratio baseline: {exc}") from None
        return self._docs[spelled]


def evaluate(gates: list[Gate], results: Results, results_path: Union[str, Path],
             base_dir: Union[str, Path] = ".") -> list[GateCheck]:
    """Every check of every gate against `results`.

    results_path: the results file as the user spelled it; the reports named in messages
    (compare.md, coco.md) are its neighbours. base_dir: where relative baseline paths start.
    A baseline that cannot be read is a UserError.
    """
    folder = Path(results_path).parent
    baselines = Baselines(Path(base_dir))
    for gate in gates:  # a missing baseline is a usage error before any check runs
        if gate.baseline is not None:
            baselines.read(gate.baseline)
    checks: list[GateCheck] = []
    for gate in gates:
        spec = GATES[gate.name]
        report = str(folder / f"{spec.section}.md")
        section = getattr(results, spec.section)
        if section is None:
            checks.append(_cannot_check(gate, spec, report,
                                        f"the results have no '{spec.section}' section (run "
                                        f"`harness {spec.section}` into {folder})"))
            continue
        if spec.section == "coco":
            configurations = [(_coco_id(r), _coco_words(r), r,
                               None if r.ok else r.status or "no status")
                              for r in section.rows or []]
        else:
            configurations = [(_target_id(t, i), _target_words(t), t,
                               None if t.available else t.reason or "not available")
                              for i, t in enumerate(section.targets or [])]
        if gate.name == "max_delta_ap":  # PyTorch fp32 rows are the reference: ΔAP is 0
            configurations = [c for c in configurations
                              if (c[2].backend, c[2].precision) != ("torch", "fp32")]
        gate_checks = []
        seen: dict[str, int] = {}
        for config_id, words, entry, unavailable in configurations:
            limit = gate.limit_for(entry.precision)
            if limit is None:
                continue
            seen[config_id] = seen.get(config_id, 0) + 1
            if seen[config_id] > 1:  # two rows alike: keep test names unique
                config_id = f"{config_id}-{seen[config_id]}"
            check = GateCheck(gate.name, config_id, words, report, limit=limit)
            if unavailable:
                gate_checks.append(_skip(check, unavailable))
                continue
            try:
                value, detail = spec.value(entry, gate, baselines)
            except Missing as exc:
                gate_checks.append(_error(check, str(exc)))
                continue
            gate_checks.append(GateCheck(gate.name, config_id, words, report,
                                         value=value, limit=limit, detail=detail))
        if not gate_checks:
            kind = "coco rows" if spec.section == "coco" else "compare targets"
            reason = f"no {kind} of {gate.precisions_text()} in the results"
            if gate.name == "max_delta_ap":
                reason += " besides the PyTorch fp32 reference"
            gate_checks.append(_cannot_check(gate, spec, report, reason))
        checks.extend(gate_checks)
    return checks


def _skip(check: GateCheck, reason: str) -> GateCheck:
    return GateCheck(check.gate, check.configuration, check.described, check.report,
                     limit=check.limit, skipped=f"{check.test_name}: {reason}")


def _error(check: GateCheck, error: str) -> GateCheck:
    return GateCheck(check.gate, check.configuration, check.described, check.report,
                     limit=check.limit, error=error)


def _cannot_check(gate: Gate, spec: GateSpec, report: str, reason: str) -> GateCheck:
    """A gate with nothing to check fails: the results it was meant for are not there."""
    config_id = "no-rows" if spec.section == "coco" else "no-targets"
    return GateCheck(gate.name, config_id, reason, report, error=reason)
