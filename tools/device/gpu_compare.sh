#!/usr/bin/env bash
# On the GPU machine: the gpu-marked tests (PyTorch CUDA, onnxruntime CUDA) and `harness
# compare` with PyTorch CUDA as the reference against onnxruntime CUDA fp32 / fp16 (TF32 off on
# both sides). Same carried files as gpu_coco.sh. Writes $OUT/reports/fixture-gpu-h100-compare/.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
. "$(dirname "$0")/install_stack.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/backends -m gpu -rs 2>&1 | tee "$OUT/gpu_tests.log"
cfg=harness/fixture/yolov5_n_synth_320.py; ckpt=harness/fixture/yolov5_n_synth_320.pth
out=reports/fixture-gpu-h100-compare
python3 -m harness synth data/gpu --images 400 --seed 2 --val-fraction 0.5 > "$OUT/synth.log" 2>&1
mkdir -p $out/models
python3 -m harness export $cfg $ckpt -o $out/models/raw_fp32.onnx > /dev/null
python3 -m harness export $cfg $ckpt -o $out/models/raw_fp16.onnx --precision fp16 > /dev/null
python3 -m harness compare $cfg $ckpt $out/models/raw_fp32.onnx $out/models/raw_fp16.onnx \
  --images data/gpu/val2017 --count 16 --device cuda --provider cuda --out $out 2>&1 \
  | grep -v "batch/s\|s/batch" | tee "$OUT/compare.log"
rm -rf $out/models && mkdir -p "$OUT/reports" && cp -r $out "$OUT/reports/"
