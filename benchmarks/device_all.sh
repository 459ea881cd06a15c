#!/usr/bin/env bash
# One device call for several issues at once (each part time-boxed by its own script): the graph backend's GPU tests,
# the end-to-end overhead profile and the VAE precision check (latency_device.sh overhead), the real-time stream
# (stream_device.sh), and the serving load test (serve_device.sh turbo). Everything under $OUT is packed into one
# archive at the end (the device tool returns a bounded number of files).
# Carry .whl with the wheels each script names.  Usage:  COMMIT=<sha> bash benchmarks/device_all.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$SECONDS
RUNS="1 step" OUT=$OUT/latency bash benchmarks/latency_device.sh overhead 2>&1 | grep -vE "^W1202|sympy" | tail -n 60
echo "== overhead part done at $((SECONDS - t0))s"
STREAM_S=${STREAM_S:-200} OUT=$OUT/stream bash benchmarks/stream_device.sh 2>&1 | tail -n 70
echo "== stream part done at $((SECONDS - t0))s"
SERVE_S=${SERVE_S:-25} OUT=$OUT/serve bash benchmarks/serve_device.sh turbo 2>&1 | tail -n 20
echo "== serve part done at $((SECONDS - t0))s"
tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
