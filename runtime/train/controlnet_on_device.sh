#!/usr/bin/env bash
# The embedded model's ControlNet on a GPU machine, and the adapters' device timings, as device calls of <= 10 minutes:
#
#   bash runtime/train/controlnet_on_device.sh train   # ControlNet stage (3000 x 512, ~5 min on an H200, time-boxed at
#                                                      # 7 min), export, evaluation (500 fresh masks), packed under $OUT
#   bash runtime/train/controlnet_on_device.sh bench   # LoRA switch under a CUDA graph; ControlNet per-step cost vs
#                                                      # diffusers (+ torch.compile); SD1.5 at 512, fp16 (~3-5 min);
#                                                      # carry .whl (../shared/tools/device_wheels.sh: diffusers)
#
# `train` run again resumes the stage: from the run folder if the machine is still warm, else from the parts of the
# previous call copied to $PARTS (default .carry/). The stage's settings are the recipe's (diffrt.train.recipes
# STAGES["controlnet"]); CN_STEPS=N overrides the step count (N = the step reached ends the stage there).
# COMMIT=<sha> is recorded in the result files.
set -euo pipefail
PHASE=${1:-train}
OUT=${OUT:-/tmp/out}; RUN=${RUN:-controlnet_run}; PARTS=${PARTS:-.carry}
mkdir -p "$OUT"
if ! python3 -c "import diffrt" 2>/dev/null; then
  # pip cannot build an editable install without the network (setuptools), so map the layout by symlinks instead.
  mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels
  export PYTHONPATH=/tmp/pp:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

case $PHASE in
train)
  if [ ! -f "$RUN/controlnet/state.json" ] && ls "$PARTS"/controlnet_run.tgz.part-* >/dev/null 2>&1; then
    mkdir -p "$RUN" && cat "$PARTS"/controlnet_run.tgz.part-* | tar xzf - -C "$RUN"
  fi
  python3 -m diffrt.cli train controlnet "$RUN" --max-minutes 7 ${CN_STEPS:+--steps "$CN_STEPS"} 2>&1 \
    | tee "$OUT/controlnet_train.log"
  if [ -f "$RUN/controlnet/model/config.json" ]; then
    python3 benchmarks/control_adherence.py --controlnet "$RUN/controlnet/model" --count "${PROMPTS:-500}" \
      --commit "${COMMIT:-}" --json "$OUT/control_adherence.json" --grid "$OUT/control_adherence.png"
    cp -r "$RUN/controlnet/model" "$OUT/default_controlnet"
  fi
  tar czf - -C "$RUN" --exclude='.tmp-*' . | split -b 15m - "$OUT/controlnet_run.tgz.part-"
  ;;
bench)
  # diffusers (the peer) from the wheels of ../shared/tools/device_wheels.sh, carried as .whl
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-$PWD}
  timeout 560 python3 benchmarks/adapters.py --commit "${COMMIT:-}" --json "$OUT/adapters.json" 2>&1 \
    | tee "$OUT/adapters.log"
  ;;
*) echo "phase train or bench" >&2; exit 2 ;;
esac
