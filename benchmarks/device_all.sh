#!/usr/bin/env bash
# One device call for several issues at once (each part time-boxed by its own script): the graph backend's GPU tests,
# the end-to-end overhead profile and the VAE precision check (latency_device.sh overhead), the serving load test
# (serve_device.sh turbo) and the real-time stream (stream_device.sh). Each part's files are packed into one archive
# as soon as it ends (the device tool returns a bounded number of files, and a call cut short keeps what finished).
# Carry .whl with the wheels each script names.  Usage:  COMMIT=<sha> bash benchmarks/device_all.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DIFFRT_CALL=${DIFFRT_CALL:-$(date -u +%Y%m%dT%H%M%S)-$$}  # one call for every part's rows
t0=$SECONDS
pack() { tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"; echo "== $1 done at $((SECONDS - t0))s"; }
RUNS="1 step" OUT=$OUT/latency bash benchmarks/latency_device.sh overhead 2>&1 | grep -vE "^W1202|sympy" | tail -n 45
pack latency
SERVE_S=${SERVE_S:-20} OUT=$OUT/serve bash benchmarks/serve_device.sh turbo 2>&1 | tail -n 12
pack serve
STREAM_S=${STREAM_S:-170} OUT=$OUT/stream bash benchmarks/stream_device.sh 2>&1 | tail -n 70
pack stream
