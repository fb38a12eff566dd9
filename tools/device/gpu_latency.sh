#!/usr/bin/env bash
# On the GPU machine: experiments/bench_latency.py on CUDA — the harness's inference figure
# (host end-to-end on a resident batch) against a bare loop over the same module / session,
# with the compute figure (CUDA events; onnxruntime IO binding) beside them. Needs the mm
# stack's wheels and the mmcv sdist carried in .whl/ (tools/device/fetch_wheels.sh);
# onnxruntime rows need onnxruntime-gpu reassembled as /root/wheels/onnxruntime_gpu-*.whl
# (without it only PyTorch is measured). Writes $OUT/bench_latency.txt.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
. "$(dirname "$0")/install_stack.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
backends="torch"
if python3 -c "import torch, onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  backends="torch onnxruntime"
fi
python3 experiments/bench_latency.py --device cuda --backends $backends --warmup 50 \
  --runs 500 --rounds 5 2>&1 | grep -v "^$" | tee "$OUT/bench_latency.txt"
