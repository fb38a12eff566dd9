"""The installed tool carries what `harness demo` needs: a wheel built from this tree, installed
into a bare folder and run from another working directory, finds its shipped experiment and
fixture detector (harness:experiments/demo.toml, harness:fixture/...) and runs the demo's first
steps — synthetic data into the current folder, the packaged fixture loaded and run on it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The demo's first steps as the installed package runs them: the shipped experiment, its
# model files from the package, the fixture on one of the synthetic images step 1 wrote.
FIRST_STEPS = """
import json, sys
from pathlib import Path
import harness
from harness.cli import main
from harness.experiment import load_experiment

exp = load_experiment("harness:experiments/demo.toml")
image = sorted(Path(exp.data.images).glob("*.jpg"))[0]
code = main(["detect", str(exp.model.config), str(exp.model.checkpoint), str(image),
             "--json", "dets.json"])
print(json.dumps({"harness": harness.__file__, "config": str(exp.model.config),
                  "checkpoint": str(exp.model.checkpoint), "code": code}))
"""


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_another_folder(tmp_path):
    # build from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT / "harness", source / "harness",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
         "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")], tmp_path, env)
    wheel, = (tmp_path / "wheel").glob("harness-*.whl")
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)], tmp_path, env)
    shipped = {p.relative_to(site / "harness").as_posix()
               for p in (site / "harness").glob("*/*") if p.suffix in (".py", ".pth", ".toml")}
    assert {"experiments/demo.toml", "experiments/fixture.toml", "fixture/yolov5_n_synth_320.py",
            "fixture/yolov5_n_synth_320.pth"} <= shipped

    # another folder, the install first on the path (before the checkout's editable install)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    helped = run([sys.executable, "-m", "harness", "demo", "--help"], elsewhere, env)
    assert "harness:experiments/demo.toml" in helped.stdout

    # step 1 of the demo (its data folder, relative to the current folder), then the model
    run([sys.executable, "-m", "harness", "synth", "data/demo", "--images", "2", "--seed", "1",
         "--val-fraction", "0.5"], elsewhere, env)
    done = run([sys.executable, "-c", FIRST_STEPS], elsewhere, env)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    for key in ("harness", "config", "checkpoint"):
        assert Path(report[key]).is_relative_to(site), (key, report[key])
    dets = json.loads((elsewhere / "dets.json").read_text())
    assert len(dets["images"]) == 1 and dets["model"]
