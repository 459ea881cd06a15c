#!/usr/bin/env bash
# One device call of the serving load test (benchmarks/serve_load.py) on a GPU: `diffrt serve` with the SD2.1
# architecture (random weights, fp16, the cuda-graph backend) at 512x512, enough clients that the worker is never
# idle, reported as images/s against the single-request latency. Logs and JSON under $OUT.
# Carry .whl, made with:
#   ../shared/tools/device_wheels.sh fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 \
#     prometheus-client==0.26.0 python-multipart==0.0.34 httpx==0.28.1 httpcore==1.0.9 anyio==4.16.0 \
#     sniffio==1.3.1 certifi idna pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 annotated-doc==0.0.7 typing-extensions==4.16.0 opentelemetry-api==1.45.2
# (fastapi 0.165 imports opentelemetry; without that wheel the server does not start on the device)
# Usage:  COMMIT=<sha> bash benchmarks/serve_device.sh [turbo|lcm|all]   (SERVE_S: seconds of load per run)
set -u
PHASE=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
# pip cannot build an editable install without the network (setuptools), so map the layout by symlinks instead.
mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels && ln -sfn "$PWD/export" runtime/export
export PYTHONPATH=/tmp/pp:$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/diffrt-cache
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
stage() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s: $(grep -E '"(images_per_s|single_request_ms|p99_ms|errors|lost)"' "$OUT/$name.log" | tr -d ' \n')"; }
C=${COMMIT:-unknown}; S=${SERVE_S:-45}
export DIFFRT_CALL=${DIFFRT_CALL:-$(date -u +%Y%m%dT%H%M%S)-$$}  # every row this call writes names it (ratios only within one call)
run() { local name=$1; shift
  stage "$name" $((S + 150)) python3 benchmarks/serve_load.py --model sd21 --size 512x512 --max-size 1024 \
    --clients 32 --max-queue 64 --duration "$S" --warmup-s 10 --single 20 --commit "$C" \
    --out "$OUT/serve_load_h200.json" "$@"; }
case $PHASE in turbo|all)
  run turbo_n1 --steps 1 --sampler turbo --guidance 0 --n 1
  run turbo_n4 --steps 1 --sampler turbo --guidance 0 --n 4 ;;
esac
case $PHASE in lcm|all)
  run lcm_n1 --steps 4 --sampler lcm --guidance 1 --n 1 ;;
esac
stage gpu_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_units.py
