#!/usr/bin/env bash
# One device call: the GPU-marked tests and the UNet benchmark, each stage time-boxed, logs and JSON under $OUT.
# Usage on the device (carry .whl from ../shared/tools/device_wheels.sh):  COMMIT=<sha> bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
# pip cannot build an editable install without the network (setuptools), so map the layout by symlinks instead.
mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels && ln -sfn "$PWD/export" runtime/export
export PYTHONPATH=/tmp/pp:$PWD:/tmp/site
export DIFFRT_CALL=${DIFFRT_CALL:-$(date -u +%Y%m%dT%H%M%S)-$$}  # every row this call writes names it (ratios only within one call)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
stage() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log")"; }
stage precompile 100 python3 benchmarks/kernels.py --precompile 8 --only none
stage kernel_tests 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_group_norm.py tests/test_attention.py
stage unet_bench 160 python3 benchmarks/unet.py --preset sd15 --size 512 --commit "${COMMIT:-unknown}" --out "$OUT/unet_sd15_512.json"
stage model_tests 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_backends.py tests/test_samplers.py
grep -E "ms  p20" "$OUT/unet_bench.log"
