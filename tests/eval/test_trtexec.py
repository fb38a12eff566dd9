"""trtexec beside the harness's inference figure (harness.eval.trtexec), with a stand-in
`trtexec` on the PATH that writes the documented --exportTimes trace (TensorRT 8.x / 10.x
keys, sampleReporting.cpp exportJSONTrace) and an older trace format; where trtexec is not on
the PATH nothing runs."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.eval.trtexec import beside, command, read_trace, run_trtexec, shapes_argument

STAND_IN = """#!{python}
import json, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
open({log!r}, "w").write(json.dumps(sys.argv[1:]))
if "fail" in args["loadEngine"]:
    print("[E] Error: engine cannot be deserialized"); sys.exit(1)
n = int(args["iterations"])
records = []
for i in range(n):
    t = i * 1.0
    records.append({{"startEnqMs": t, "endEnqMs": t + 0.05, "startH2dMs": t, "endH2dMs": t + 0.1,
                    "startComputeMs": t + 0.1, "endComputeMs": t + 0.5, "startD2hMs": t + 0.5,
                    "endD2hMs": t + 0.6, "h2dMs": 0.1, "computeMs": 0.4 + (0.1 if i == 0 else 0),
                    "d2hMs": 0.1, "latencyMs": 0.6}})
json.dump(records, open(args["exportTimes"], "w"))
print("[I] GPU Compute Time: median = 0.4 ms")
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "argv.json"
    exe = folder / "trtexec"
    exe.write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return log


def test_run_reads_the_trace_and_the_ratios(stand_in, tmp_path):
    found = run_trtexec(tmp_path / "m.engine", {"images": (4, 3, 320, 320), "img_shape": (4, 2)},
                        warmup_ms=100, iterations=20)
    argv = json.loads(stand_in.read_text())
    assert f"--loadEngine={tmp_path / 'm.engine'}" in argv
    assert "--shapes=images:4x3x320x320,img_shape:4x2" in argv
    assert "--warmUp=100" in argv and "--iterations=20" in argv
    assert any(a.startswith("--exportTimes=") for a in argv)
    assert found["runs"] == 20
    assert found["gpu_compute"]["median"] == pytest.approx(0.4)
    assert found["host_latency"]["median"] == pytest.approx(0.6)
    assert found["h2d"]["median"] == pytest.approx(0.1)
    assert found["enqueue"]["median"] == pytest.approx(0.05)
    ratios = beside({"host": {"median": 0.66}, "compute": {"median": 0.42}}, found)
    assert ratios["host_over_host_latency"] == pytest.approx(1.1)
    assert ratios["compute_over_gpu_compute"] == pytest.approx(1.05)


def test_a_failing_run_is_one_line(stand_in, tmp_path):
    with pytest.raises(UserError, match="trtexec failed on .*fail.engine \\(exit 1\\): "
                                        "\\[E\\] Error: engine cannot be deserialized"):
        run_trtexec(tmp_path / "fail.engine", {"images": (1, 3, 8, 8)})


def test_without_trtexec_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_trtexec(tmp_path / "m.engine", {"images": (1, 3, 8, 8)}) is None


def test_the_older_trace_format_and_a_bad_file(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"startInMs": 0, "endInMs": 0.2, "startComputeMs": 0.2,
                                "endComputeMs": 1.2, "startOutMs": 1.2, "endOutMs": 1.3,
                                "inMs": 0.2, "computeMs": 1.0, "outMs": 0.1,
                                "latencyMs": 1.3, "endToEndMs": 1.3}] * 3))
    doc = read_trace(old)
    assert doc["gpu_compute"]["median"] == pytest.approx(1.0)
    assert doc["h2d"]["median"] == pytest.approx(0.2) and "enqueue" not in doc
    bad = tmp_path / "bad.json"
    bad.write_text("[{}]")
    with pytest.raises(UserError, match="no inference record"):
        read_trace(bad)
    assert shapes_argument({"images": (1, 3, 640, 640)}) == "images:1x3x640x640"
    assert command(Path("e"), {"images": (1, 3, 8, 8)}, 5, 7, Path("t"))[0] == "trtexec"
