#!/usr/bin/env bash
# On the GPU machine: train the two-stage fixture (harness/fixture/faster_rcnn_r18_synth_320.py)
# on the synthetic train split that `harness synth data/synth --images 2000 --seed 0
# --val-fraction 0.1` writes (generated there, byte-identical to ours), with the carried mm
# stack (install_stack.sh; mmcv CPU ops, so RoIAlign / NMS on CUDA are torchvision's, see
# train_fixture.py). One call runs at most EPOCHS_PER_CALL epochs and leaves the work folder
# in $OUT/wd; carry it back as .train/wd and the next call resumes from it. The last call
# writes $OUT/faster_rcnn_r18_synth_320.pth and the test-loop metrics in $OUT/train.log.
set -euo pipefail
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
. "$(dirname "$0")/install_stack.sh"
if [ ! -f data/synth/annotations/instances_val2017.json ]; then
  python3 -c "from pathlib import Path; from harness.synth import generate_synthetic_coco; \
generate_synthetic_coco(Path('data/synth'), images=2000, seed=0, val_fraction=0.1)"
fi
mkdir -p /tmp/wd
[ -d .train/wd ] && cp -rn .train/wd/. /tmp/wd/
resume=""; ls /tmp/wd/epoch_*.pth >/dev/null 2>&1 && resume="--resume"
timeout "${TRAIN_SECONDS:-500}" python3 experiments/fixture/train_fixture.py --data data/synth \
  --config harness/fixture/faster_rcnn_r18_synth_320.py --work-dir /tmp/wd --out "$OUT" \
  --workers 8 --threads 8 $resume 2>&1 | grep -vE "paramwise_options|^\s*$" | tail -60 \
  > "$OUT/train.log" || true
mkdir -p "$OUT/wd"
last=$(ls -t /tmp/wd/epoch_*.pth 2>/dev/null | head -1 || true)
[ -n "$last" ] && cp "$last" /tmp/wd/last_checkpoint "$OUT/wd/"
tail -5 "$OUT/train.log"
