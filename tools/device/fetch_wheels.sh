#!/usr/bin/env bash
# Fetch, here, the cp312 wheels the GPU machine lacks (see docs/gpu-machine.md) into .whl/
# (ignored by git through .git/info/exclude), plus the mmcv 2.0.1 sdist and the
# setuptools/wheel pair its build needs (.whl/build/, kept apart so they are not installed
# into the run's site folder). Then run tools/device/gpu_tests.sh there with .whl carried.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info .whl/build
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$@"
}
get .whl mmengine==0.10.7 mmdet==3.0.0 mmyolo==0.6.0 addict yapf termcolor terminaltables \
  shapely pycocotools platformdirs tomli prettytable wcwidth six rich markdown-it-py mdurl \
  pygments tqdm
get .whl/build setuptools==69.5.1 wheel==0.43.0
python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.0.1 -d .whl \
  || echo "mmcv sdist: run tools/build_mmcv.py once here, or copy mmcv-2.0.1.tar.gz into .whl/"
ls -1 .whl
