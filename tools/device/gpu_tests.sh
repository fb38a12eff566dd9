#!/usr/bin/env bash
# On the GPU machine (python3.12, torch CUDA, no mm stack): install the carried wheels into
# /tmp/site, build mmcv 2.0.1's CPU ops from its sdist (C++17 patch, setuptools 69.5.1 from a
# side folder), then run the gpu-marked tests and the model source on CUDA. Logs go to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/oldst .whl/build/*.whl
mkdir -p /tmp/b && tar xzf .whl/mmcv-2.0.1.tar.gz -C /tmp/b
sed -i 's/-std=c++14/-std=c++17/' /tmp/b/mmcv-2.0.1/setup.py
t0=$(date +%s)
(cd /tmp/b/mmcv-2.0.1 && CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 MAX_JOBS=16 \
  PYTHONPATH=/tmp/oldst:/tmp/site python3 -m pip install -q --no-index --no-deps \
  --no-build-isolation --target /tmp/site . > "$OUT/mmcv_build.log" 2>&1)
echo "mmcv built in $(( $(date +%s) - t0 )) s"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/backends -m gpu -rs 2>&1 | tee "$OUT/gpu_tests.log"
