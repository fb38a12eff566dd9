#!/usr/bin/env bash
# On the GPU machine: experiments/bench_coco_overhead.py on CUDA — a `harness coco` pass's
# wall time over the inference inside it, PyTorch and onnxruntime at batch 1 and 4, with the
# fast batched post-processing (auto) and the numpy reference kernel side by side, and each
# pass's AP; then experiments/bench_latency.py (rounds and interleaved ratios). Needs .whl/
# carried (tools/device/fetch_wheels.sh) and, for onnxruntime rows, onnxruntime-gpu
# reassembled as /root/wheels/onnxruntime_gpu-*.whl. Writes $OUT/bench_coco_overhead.txt
# and $OUT/bench_latency.txt.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
. "$(dirname "$0")/install_stack.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
backends="torch"
if python3 -c "import torch, onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  backends="torch onnxruntime"
fi
python3 experiments/bench_coco_overhead.py --device cuda --count "${COUNT:-200}" \
  --backends $backends --batches 1 4 --post ${POSTS:-auto reference} --repeats 2 2>&1 \
  | grep -v "^$" | tee "$OUT/bench_coco_overhead.txt"
if [ "${LATENCY:-1}" = 1 ]; then
  python3 experiments/bench_latency.py --device cuda --backends $backends --warmup 100 \
    --runs 1000 --rounds 10 2>&1 | grep -v "^$" | tee "$OUT/bench_latency.txt"
fi
