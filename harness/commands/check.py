"""`harness check model.onnx`: TensorRT pre-flight on the CPU — what will stop a TensorRT build
(TopK K > 3840, operators the ONNX parser lacks, missing plugins, an invalid graph) and what
changes on the way in, as a table of findings. Exit 1 when a finding is an error."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", type=Path, help="ONNX file (weights may stay external)")
    p.add_argument("--trt-version", default="10",
                   help="TensorRT whose ONNX operator list to check against: 10 (10.x) or 8.6")
    p.add_argument("--config", type=Path, default=None,
                   help="mmyolo config: name the test_cfg value a TopK's K comes from "
                        "(a harness export records it already)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from harness.export.check import check_file

    values = config_values(args.config) if args.config is not None else None
    result = check_file(args.onnx, args.trt_version, values)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print_findings(result)
    return 0 if result else 1


def config_values(cfg_path: Path) -> dict[str, int]:
    """The integer settings of the config's model.test_cfg, as `model.test_cfg.<key>`."""
    from harness.models.mmyolo import read_config

    test_cfg = read_config(cfg_path).model.get("test_cfg") or {}
    return {f"model.test_cfg.{k}": v for k, v in test_cfg.items() if type(v) is int}


def print_findings(result: Any, out: Callable[[str], Any] = print) -> None:
    """The findings as a table, then one line: will it build (as far as the CPU can tell)."""
    out(f"{result.path}: TensorRT {result.trt_version} pre-flight (operators: "
        f"{result.operators_source})")
    if result.findings:
        out(f"  {'severity':<8}  {'check':<22}  message")
        for f in result.findings:
            where = f" [{f.module}]" if f.module else ""
            out(f"  {f.severity:<8}  {f.code:<22}  {f.message}{where}")
    errors = len(result.errors)
    out(f"{errors} error(s): the TensorRT build will fail" if errors else
        f"no errors ({len(result.findings)} other finding(s)): nothing found that stops a "
        "TensorRT build")


def finding_lines(result: Any) -> list[str]:
    """Errors and warnings one per line, and how many info findings `harness check` shows:
    what `harness export` and `harness build` print."""
    lines = [f"check: {f.severity}: {f.message}" for f in result.findings
             if f.severity != "info"]
    infos = len(result.findings) - len(lines)
    if infos:
        lines.append(f"check: {infos} info finding(s): harness check {result.path}")
    return lines
