#!/usr/bin/env bash
# One device call (about 6 minutes) for the real-time stream (issue 15): its GPU tests, then benchmarks/stream.py
# (diffrt.Stream, StreamDiffusion 0.1.1 and the naive pipeline call, SD2.1 arch 1 step and SD1.5 arch LCM 4 steps at
# 512², the ablation), each stage time-boxed; logs, JSON and the markdown table under $OUT.
# Carry .whl holding diffusers 0.42.1, importlib_metadata and streamdiffusion 0.1.1 (installed with --no-deps), made
# from the project root with:
#   ../shared/tools/device_wheels.sh diffusers==0.42.1 importlib_metadata streamdiffusion==0.1.1
# Usage:  COMMIT=<sha> bash benchmarks/stream_device.sh        (STREAM_S: the benchmark's time box, default 250)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
# pip cannot build an editable install without the network (setuptools), so map the layout by symlinks instead.
mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels && ln -sfn "$PWD/export" runtime/export
export PYTHONPATH=/tmp/pp:$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/diffrt-cache
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import streamdiffusion, diffusers; print('streamdiffusion', diffusers.__version__)" 2>&1 | tail -n 1
stage() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log")"; }
C=${COMMIT:-unknown}
export DIFFRT_CALL=${DIFFRT_CALL:-$(date -u +%Y%m%dT%H%M%S)-$$}  # every row this call writes names it (ratios only within one call)
S=${STREAM_S:-250}
stage gpu_tests 130 python3 -m pytest -q -x -m gpu -p no:cacheprovider -s tests/test_stream_gpu.py
grep -E "max abs|passed|failed|Error" "$OUT/gpu_tests.log" | tail -n 20
stage stream "$S" python3 benchmarks/stream.py --archs sd21,sd15 --budget-s $(( S - 40 )) --commit "$C" --out "$OUT/stream_h200.json"
python3 benchmarks/stream.py --report "$OUT/stream_h200.json" > /dev/null 2>&1
cat "$OUT/stream_h200.md" 2>/dev/null || tail -n 30 "$OUT/stream.log"
