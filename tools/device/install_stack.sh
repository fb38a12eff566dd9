#!/usr/bin/env bash
# Sourced by the GPU scripts: install the carried cp312 wheels (.whl/, from fetch_wheels.sh)
# into /tmp/site and build mmcv 2.0.1's CPU ops there from its sdist (C++17 patch,
# setuptools 69.5.1 + wheel 0.43 from a side folder); install onnxruntime-gpu into
# /tmp/ortsite when its wheel was reassembled in /root/wheels; set PYTHONPATH so that
# onnxruntime-gpu comes before the machine's CPU-only onnxruntime. A second call on the same
# warm machine skips the installs. Expects $OUT (logs).
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
if [ ! -d /tmp/ortsite/onnxruntime ] && ls /root/wheels/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ortsite \
    /root/wheels/onnxruntime_gpu-*.whl
fi
export PYTHONPATH=/tmp/ortsite:/tmp/site:$PWD
