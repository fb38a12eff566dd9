"""trtexec on the same engine, for the number TensorRT users already trust: where `trtexec` is
on the PATH (every TensorRT install ships it), run it with `--loadEngine`, the batch's shapes
and `--exportTimes`, and read its per-inference trace (samples/common/sampleReporting.cpp,
exportJSONTrace): GPU compute time, H2D and D2H latency, enqueue time, and host latency =
H2D + compute + D2H — each summarised as the harness summarises its own
(harness.eval.latency.summarize_ms), to put beside harness.eval.inference_timing's figures.

The trace's keys, by TensorRT version: 8.x / 10.x `startEnqMs, endEnqMs, startH2dMs, endH2dMs,
startComputeMs, endComputeMs, startD2hMs, endD2hMs, h2dMs, computeMs, d2hMs, latencyMs`; older
ones `inMs, computeMs, outMs, latencyMs, endToEndMs` (samples/trtexec/tracer.py). Both read.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from harness.errors import UserError, first_line
from harness.eval.latency import summarize_ms

# trace key → what it is, per format; "enqueue" is end - start of the enqueue call
INTERVALS = {"gpu_compute": ("computeMs",), "h2d": ("h2dMs", "inMs"),
             "d2h": ("d2hMs", "outMs"), "host_latency": ("latencyMs",)}
TIMEOUT_S = 600


def shapes_argument(shapes: Mapping[str, Sequence[int]]) -> str:
    """`images:4x3x320x320,img_shape:4x2` (trtexec's --shapes spec)."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}"
                    for name, shape in shapes.items())


def command(engine: Path, shapes: Mapping[str, Sequence[int]], warmup_ms: int,
            iterations: int, export: Path, binary: str = "trtexec") -> list[str]:
    """The trtexec command line the harness runs."""
    return [binary, f"--loadEngine={engine}", f"--shapes={shapes_argument(shapes)}",
            f"--warmUp={int(warmup_ms)}", f"--iterations={int(iterations)}",
            f"--exportTimes={export}"]


def read_trace(path: Path) -> dict[str, Any]:
    """Per-interval statistics (ms) of an --exportTimes file; a file trtexec did not write
    in either known format is a UserError naming what it lacks."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"trtexec's --exportTimes file {path} cannot be read: "
                        f"{first_line(exc)}") from None
    records = [r for r in records if isinstance(r, dict) and "computeMs" in r]
    if not records:
        raise UserError(f"trtexec's --exportTimes file {path} holds no inference record "
                        "(no computeMs)")
    out: dict[str, Any] = {"runs": len(records)}
    for name, keys in INTERVALS.items():
        key = next((k for k in keys if k in records[0]), None)
        if key is not None:
            out[name] = summarize_ms([float(r[key]) / 1000.0 for r in records])
    if "startEnqMs" in records[0]:
        out["enqueue"] = summarize_ms([(float(r["endEnqMs"]) - float(r["startEnqMs"])) / 1000.0
                                       for r in records])
    return out


def run_trtexec(engine: Path, shapes: Mapping[str, Sequence[int]], warmup_ms: int = 200,
                iterations: int = 500) -> Optional[dict[str, Any]]:
    """trtexec's figures for `engine` at `shapes`, or None where trtexec is not on the PATH.
    A run that fails is a UserError with trtexec's last output line."""
    binary = shutil.which("trtexec")
    if binary is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "times.json"
        argv = command(Path(engine), shapes, warmup_ms, iterations, export, binary)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise UserError(f"trtexec did not finish within {TIMEOUT_S} s on {engine}") from None
        if done.returncode != 0 or not export.is_file():
            said = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"trtexec failed on {engine} (exit {done.returncode}): {said[0]}")
        found = read_trace(export)
    found["command"] = " ".join(argv[1:])
    return found


def beside(harness: Mapping[str, Any], trtexec: Mapping[str, Any]) -> dict[str, Any]:
    """Ratios of the harness's medians to trtexec's: host end-to-end over host latency,
    compute over GPU compute time."""
    def ratio(ours: Optional[Mapping[str, float]], theirs: Optional[Mapping[str, float]]):
        if not ours or not theirs or not theirs.get("median"):
            return None
        return ours["median"] / theirs["median"]

    return {"host_over_host_latency": ratio(harness.get("host"), trtexec.get("host_latency")),
            "compute_over_gpu_compute": ratio(harness.get("compute"),
                                              trtexec.get("gpu_compute"))}
