"""Install mmcv 2.0.1 with its compiled ops into the running Python, building it once.

mmyolo 0.6.0 and mmdet 3.0.0 accept only mmcv < 2.1, and mmcv 2.0.1 ships no wheel for
Python 3.11 + PyTorch 2.x, so it is built from its sdist. Two patches are needed:
its setup.py asks for C++14 while PyTorch 2.x headers need C++17, and it imports
`pkg_resources`, which setuptools >= 70 no longer provides (torch itself wants
setuptools >= 77, so the old setuptools lives in a side folder put on PYTHONPATH for the
build only). The wheel is cached outside the repository, keyed by Python and torch
versions, so the second run takes seconds.

Usage: python tools/build_mmcv.py [--cache DIR] [--jobs N]
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

MMCV_VERSION = "2.0.1"
OLD_SETUPTOOLS = "setuptools==69.5.1"
# setuptools 69 has no bdist_wheel of its own: it comes from `wheel` (0.43, before wheel
# handed the command back to setuptools >= 70.1). A fresh env has no `wheel` at all.
OLD_WHEEL = "wheel==0.43.0"


def mmcv_ops_importable() -> bool:
    probe = "import mmcv, mmcv.ops; assert mmcv.__version__ == '%s'" % MMCV_VERSION
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        fail("torch is not importable in this Python; install torch==2.13.0 first")
    return out.stdout.strip().replace("+", "_")


def fail(message: str) -> None:
    print(f"build_mmcv: error: {message}", file=sys.stderr)
    sys.exit(1)


def step(message: str) -> None:
    print(f"build_mmcv: {message}", flush=True)


def pip(*args: str, env: dict | None = None, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    if quiet:
        cmd.insert(3, "-q")
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        fail(f"'{' '.join(cmd)}' exited {result.returncode}")


def build_wheel(cache: Path, jobs: int) -> Path:
    work = Path(tempfile.mkdtemp(prefix="mmcv-build-"))
    side = work / "old-setuptools"
    step(f"installing {OLD_SETUPTOOLS} and {OLD_WHEEL} into a side folder for the build")
    pip("install", "--target", str(side), OLD_SETUPTOOLS, OLD_WHEEL)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(side), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    step(f"downloading the mmcv {MMCV_VERSION} sdist")
    pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        f"mmcv=={MMCV_VERSION}", "-d", str(work), env=env)
    sdist = work / f"mmcv-{MMCV_VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    src = work / f"mmcv-{MMCV_VERSION}"
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    if "-std=c++14" not in text:
        fail("mmcv setup.py no longer contains '-std=c++14'; the patch does not apply")
    setup_py.write_text(text.replace("-std=c++14", "-std=c++17"))
    env.update(MMCV_WITH_OPS="1", MAX_JOBS=str(jobs), CUDA_VISIBLE_DEVICES="",
               FORCE_CUDA="0")
    step(f"compiling mmcv ops with {jobs} jobs (about 6-7 minutes on 2 cores)")
    started = time.time()
    log = work / "build.log"
    with open(log, "w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "-w", str(work / "dist"), str(src)],
            env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        fail(f"compiling mmcv failed (full log: {log})")
    step(f"compiled in {time.time() - started:.0f} s")
    built = glob.glob(str(work / "dist" / "mmcv-*.whl"))
    if not built:
        fail("pip wheel finished but produced no mmcv wheel")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(built[0]).name
    shutil.copy2(built[0], target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("HARNESS_WHEEL_CACHE",
                                                    Path.home() / ".cache" / "harness-wheels")))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    if mmcv_ops_importable():
        step(f"mmcv {MMCV_VERSION} with ops already importable; nothing to do")
        return
    key = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch_version()}"
    cache = args.cache / key
    cached = sorted(cache.glob(f"mmcv-{MMCV_VERSION}-*.whl"))
    wheel = cached[0] if cached else None
    if wheel:
        step(f"using cached wheel {wheel}")
    else:
        step(f"no cached wheel under {cache}; building from source")
        wheel = build_wheel(cache, args.jobs)
    # --no-deps: mmcv's own requirements (addict, mmengine, yapf, ...) come from pyproject.
    pip("install", "--no-deps", "--force-reinstall", str(wheel))
    if not mmcv_ops_importable():
        fail(f"installed {wheel.name} but 'import mmcv.ops' still fails; delete {wheel} and retry")
    step(f"mmcv {MMCV_VERSION} with ops installed from {wheel}")


if __name__ == "__main__":
    main()
