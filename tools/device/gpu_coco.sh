#!/usr/bin/env bash
# On the GPU machine: the fixture's COCO matrix on CUDA (experiments/gpu_h100.toml).
# Needs, carried or left in /root/wheels by earlier calls: the mm stack's cp312 wheels and the
# mmcv sdist in .whl/ (tools/device/fetch_wheels.sh) and onnxruntime-gpu's wheel, reassembled
# as /root/wheels/onnxruntime_gpu-*.whl. Writes $OUT/reports/fixture-gpu-h100/ and logs.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
# a second call on the same warm machine skips what the first one installed
if [ ! -d /tmp/site/mmcv ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --target /tmp/oldst .whl/build/*.whl
  mkdir -p /tmp/b && tar xzf .whl/mmcv-2.0.1.tar.gz -C /tmp/b
  sed -i 's/-std=c++14/-std=c++17/' /tmp/b/mmcv-2.0.1/setup.py
  t0=$(date +%s)
  (cd /tmp/b/mmcv-2.0.1 && CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 MAX_JOBS=16 \
    PYTHONPATH=/tmp/oldst:/tmp/site python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation --target /tmp/site . > "$OUT/mmcv_build.log" 2>&1)
  echo "mmcv built in $(( $(date +%s) - t0 )) s"
fi
if [ ! -d /tmp/ortsite/onnxruntime ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ortsite \
    /root/wheels/onnxruntime_gpu-*.whl
fi
# onnxruntime-gpu ahead of the machine's CPU-only onnxruntime
export PYTHONPATH=/tmp/ortsite:/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
python3 -m harness synth data/gpu --images 400 --seed 2 --val-fraction 0.5 > "$OUT/synth.log" 2>&1
python3 -m harness coco --experiment experiments/gpu_h100.toml --no-progress 2>&1 | tee "$OUT/coco.log"
mkdir -p "$OUT/reports" && cp -r reports/fixture-gpu-h100 "$OUT/reports/"
rm -rf "$OUT/reports/fixture-gpu-h100/cache/runs" 2>/dev/null || true
find "$OUT/reports" -name "*.onnx" -delete
