#!/usr/bin/env bash
# On the GPU machine (python3.12, torch CUDA, no mm stack): install the carried wheels into
# /tmp/site, build mmcv 2.0.1's CPU ops from its sdist (C++17 patch, setuptools 69.5.1 from a
# side folder), then run the gpu-marked tests and the model source on CUDA. Logs go to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
. "$(dirname "$0")/install_stack.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/backends -m gpu -rs 2>&1 | tee "$OUT/gpu_tests.log"
