#!/usr/bin/env bash
# On the GPU machine: the fixture's COCO matrix on CUDA (harness/experiments/gpu_h100.toml).
# Needs, carried or left in /root/wheels by earlier calls: the mm stack's cp312 wheels and the
# mmcv sdist in .whl/ (tools/device/fetch_wheels.sh) and onnxruntime-gpu's wheel, reassembled
# as /root/wheels/onnxruntime_gpu-*.whl. Writes $OUT/reports/fixture-gpu-h100/ and logs.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
. "$(dirname "$0")/install_stack.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
python3 -m harness synth data/gpu --images 400 --seed 2 --val-fraction 0.5 > "$OUT/synth.log" 2>&1
python3 -m harness coco --experiment harness:experiments/gpu_h100.toml --no-progress 2>&1 | tee "$OUT/coco.log"
mkdir -p "$OUT/reports" && cp -r reports/fixture-gpu-h100 "$OUT/reports/"
rm -rf "$OUT/reports/fixture-gpu-h100/cache/runs" 2>/dev/null || true
find "$OUT/reports" -name "*.onnx" -delete
