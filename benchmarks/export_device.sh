#!/usr/bin/env bash
# Issue 12's real-size checks on the device, in stages that each fit one device call; logs and JSON under $OUT.
#
#   COMMIT=<sha> bash benchmarks/export_device.sh STAGE [STAGE ...]
#
#   export-sd21    SD2.1 (random weights) exported in fp16 by diffrt's exporter into /tmp/diffrt-exports/sd21, every
#                  file checked on ONNX Runtime (CUDA provider if onnxruntime-gpu is set up, else CPU) against our
#                  torch modules in fp32 at 1x512^2 and 2x768^2             -> onnx_export_sd21.json   (~3 min, guess)
#   export-sdxl    the same for SDXL, the UNet with external data, at 1x1024^2 and 2x512x768 -> onnx_export_sdxl.json
#   trt            TensorRT-RTX (or TensorRT) parse + build of SD2.1's UNet, VAE decoder and text encoder, dynamic
#                  256^2-1024^2 (batch 1-4) and static 1x512^2 profiles, through `diffrt build-engine` and its cache
#                                                                            -> trt_build_sd21.json  (build s, bytes)
#   latency-sd21   end to end at 512^2 (1 step; 25 steps CFG): torch and cuda-graph (the fast path) backends,
#                  onnxruntime (IO binding; + ORT CUDA graph), diffusers + torch.compile (needs the diffusers wheel in
#                  .whl); UNet step and VAE decode alone: plain ORT, ORT CUDA graph, after ORT's SD fusions, beside the
#                  fast path's graph replays                                 -> ort_latency_sd21_512.json
#   latency-sdxl   the same for SDXL at 1024^2                               -> ort_latency_sdxl_1024.json
#   tests          the gpu-marked ONNX Runtime and TensorRT tests (TensorRT-RTX's are skipped on SM90, with the reason)
#
# A latency or trt stage exports first if its export is not on this machine. Setup, each a device call on ONE warm
# machine, back to back (see ../shared/tools/*.sh headers; prepare the parts here first by running those scripts):
#   onnxruntime-gpu: carry [".ortgK"], command `bash .ortgK/put.sh`, K = 1..N   (installs into /tmp/ortgpu)
#   TensorRT-RTX:    carry [".trtpK"], command `bash .trtpK/put.sh`, K = 1..N (benchmarks/trt_rtx_parts.py: the shared
#                    .trt1 is too large beside our tree); then the stage call itself carries ".trt2" and starts with
#                    `source .trt2/stage2.sh && ` (installs into /tmp/trtrtx)
#   diffusers:       carry [".whl"] (../shared/tools/device_wheels.sh) in a latency call, for the torch.compile peer
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=/tmp/diffrt-exports
# The presets and sizes (override to try the script on a CPU first: SD21=tiny-sd21 SDXL=tiny-sdxl S21=64 SXL=64).
SD21=${SD21:-sd21} SDXL=${SDXL:-sdxl} S21=${S21:-512} SXL=${SXL:-1024}
# The latency stages' runs (diffrt.latency.RUNS names, comma-separated) and whether to try ORT's SD fusions (FUSIONS=0
# leaves them out: on our graphs they failed, and they cost a minute).
IFS=, read -ra RUNS <<< "${RUNS:-1 step,25 steps CFG}"
LAT="--runs ${RUNS[*]@Q} --peers $([ "${FUSIONS:-1}" = 1 ] && echo --fusions)"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
# pip cannot build an editable install without the network, so map the package layout by symlinks (gpu_checks.sh).
mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels \
  && ln -sfn "$PWD/export" runtime/export
path=/tmp/pp:$PWD
for d in /tmp/ortgpu /tmp/trtrtx /tmp/site; do [ -d $d ] && path=$path:$d; done
[ -d /tmp/ortgpu ] && path=/tmp/ortgpu:$path  # before the image's CPU-only onnxruntime
export PYTHONPATH=$path:${PYTHONPATH:-} PYTHONUNBUFFERED=1
C="--commit ${COMMIT:-unknown}"
export DIFFRT_CALL=${DIFFRT_CALL:-$(date -u +%Y%m%dT%H%M%S)-$$}  # every row this call writes names it (ratios only within one call)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" >> "$OUT/gpu.txt" 2>&1
python3 -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

stage() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log")"; }
exported() { [ -f "$ROOT/$1/manifest.json" ] || stage "export-$1" 420 python3 benchmarks/onnx_device.py export \
  --presets "$1" --root "$ROOT" --out "$OUT/onnx_export_$1.json" $C; }

trt() {  # each build-engine run adds to one JSON, so a time-out keeps what was built before it
  exported "$SD21"
  local merged="$OUT/trt_build_sd21.json"; echo '{}' > "$merged"
  for tag in dynamic static; do
    local profile="--min 1,256,256 --opt 1,512,512 --max 4,1024,1024"; [ $tag = static ] && profile="--static 1,512,512"
    for component in text_encoder vae_decoder unet; do
      rm -f "/tmp/trt-$tag-$component.json"
      python3 -m diffrt.cli build-engine "$ROOT/$SD21" --components $component $profile \
        --json "/tmp/trt-$tag-$component.json"
      python3 - "$merged" "/tmp/trt-$tag-$component.json" "$tag/$component" "${COMMIT:-unknown}" <<'PY'
import json, os, sys
from benchmarks.environment import environment
merged, part, tag, commit = sys.argv[1:]
m = json.load(open(merged))
row = json.load(open(part)) if os.path.exists(part) else {"error": "no result (build failed or timed out)"}
m[tag] = {**environment(commit), **row}  # every row names its GPU, versions and commit
json.dump(m, open(merged, "w"), indent=1)
PY
    done
  done
}

for s in "$@"; do
  case $s in
    export-sd21) stage "$s" 560 python3 benchmarks/onnx_device.py export --presets "$SD21" --root "$ROOT" \
                   --out "$OUT/onnx_export_$SD21.json" $C ;;
    export-sdxl) stage "$s" 560 python3 benchmarks/onnx_device.py export --presets "$SDXL" --root "$ROOT" \
                   --out "$OUT/onnx_export_$SDXL.json" $C ;;
    trt) export -f trt exported stage; export ROOT C OUT SD21 COMMIT; stage trt 560 bash -c trt ;;
    latency-sd21) exported "$SD21"; eval stage "$s" 560 python3 benchmarks/onnx_device.py latency --preset "$SD21" \
                    --size "$S21" $LAT --root "$ROOT" --out "$OUT/ort_latency_${SD21}_$S21.json" $C ;;
    latency-sdxl) exported "$SDXL"; eval stage "$s" 560 python3 benchmarks/onnx_device.py latency --preset "$SDXL" \
                    --size "$SXL" $LAT --root "$ROOT" --out "$OUT/ort_latency_${SDXL}_$SXL.json" $C ;;
    tests) stage tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_onnxruntime_backend.py \
             tests/test_engine_cache.py -rs ;;
    *) echo "unknown stage $s (export-sd21 export-sdxl trt latency-sd21 latency-sdxl tests)"; exit 2 ;;
  esac
done
grep -hE "ms  p20|worst err|built in|cached|FAILED|SKIPPED|passed|failed" "$OUT"/*.log 2>/dev/null | head -80
