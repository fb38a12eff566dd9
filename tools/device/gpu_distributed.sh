#!/usr/bin/env bash
# On the two-GPU machine (nvidia-h200-x2): experiments/bench_distributed.py — the fixture
# matrix's accuracy pass under torchrun on 1 and 2 GPUs, the wall time of each and their
# ratio, and whether AP and per-class AP are equal. NVLink multicast stays off
# (NCCL_NVLS_ENABLE=0 and the others; the ranks talk over gloo). Needs .whl/ carried
# (tools/device/fetch_wheels.sh) and, for onnxruntime rows, onnxruntime-gpu reassembled as
# /root/wheels/onnxruntime_gpu-*.whl. Writes $OUT/bench_distributed.txt.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}" NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
. "$(dirname "$0")/install_stack.sh"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
backends="torch"
if python3 -c "import torch, onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  backends="torch onnxruntime"
fi
python3 experiments/bench_distributed.py --device cuda --count "${COUNT:-1000}" \
  --backends $backends --worlds 1 2 2>&1 | grep -v "^$" | tee "$OUT/bench_distributed.txt"
