#!/usr/bin/env bash
# The embedded model's training as it ran on the device: three phases, each one 10-minute device call on a fresh
# machine, each ending with its run folder packed under $OUT (tar.gz split into 15 MiB parts) for the next phase.
#
#   bash runtime/train/train_on_device.sh a   # step-time profile, VAE, tokenizer + text encoder
#   bash runtime/train/train_on_device.sh b   # UNet (the teacher)
#   bash runtime/train/train_on_device.sh c   # LCM distillation, export, adherence benchmark
#
# Phase b and c start from the previous phase's parts copied to $PARTS (default .carry/). Every stage is time-boxed
# with --max-minutes and then finished at the step it reached (`--steps <reached>`): the exact commands, with the
# step counts, are in runtime/train/README.md. Settings come from the environment (defaults below).
set -euo pipefail
PHASE=$1
OUT=${OUT:-/tmp/out}; RUN=${RUN:-train_run}; PARTS=${PARTS:-.carry}; PRESET=${PRESET:-default}
mkdir -p "$OUT"
if ! python3 -c "import diffrt" 2>/dev/null; then
  # pip cannot build an editable install without the network (setuptools), so map the layout by symlinks instead.
  mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels
  export PYTHONPATH=/tmp/pp:$PWD
fi
export PYTHONUNBUFFERED=1
train() { python3 -m diffrt.cli train "$@"; }
reached() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "$RUN/$1/state.json"; }
# Train a stage for at most $2 minutes, then finish it at the step it reached (exports its model and reports).
timeboxed() { local stage=$1 minutes=$2; shift 2
  train "$stage" "$RUN" "$@" --max-minutes "$minutes"
  train "$stage" "$RUN" "$@" --steps "$(reached "$stage")"; }
pack() { tar czf - -C "$RUN" --exclude='.tmp-*' "$@" | split -b 15m - "$OUT/run_$PHASE.tgz.part-"; }
unpack() { mkdir -p "$RUN" && cat "$PARTS"/run_"$1".tgz.part-* | tar xzf - -C "$RUN"; }

case $PHASE in
a)
  if [ "$PRESET" = default ]; then
    python3 benchmarks/train_step.py --unet-batches 256 1024 --vae-batches 64 256 --reps 10 --json "$OUT/train_step.json"
  fi
  timeboxed vae "${VAE_MINUTES:-4.5}" --preset "$PRESET" --batch "${VAE_BATCH:-128}" --lr "${VAE_LR:-4e-4}"
  train text "$RUN" ${TEXT_STEPS:+--steps "$TEXT_STEPS"}
  pack .
  ;;
b)
  [ -f "$RUN/text/model/config.json" ] || unpack a
  timeboxed unet "${UNET_MINUTES:-9}" --batch "${UNET_BATCH:-256}" --lr "${UNET_LR:-2e-4}" \
    --warmup "${UNET_WARMUP:-1000}" --steps 1000000
  pack --exclude='ckpt-*' .
  ;;
c)
  [ -f "$RUN/unet/model/config.json" ] || unpack b
  timeboxed lcm "${LCM_MINUTES:-4}" --batch "${LCM_BATCH:-128}" --steps 1000000
  train export "$RUN" "$RUN/student" --max-mb 30
  train export "$RUN" "$RUN/teacher" --teacher
  python3 benchmarks/adherence.py --teacher "$RUN/teacher" --student "$RUN/student" --prompts "${PROMPTS:-500}" \
    --json "$OUT/adherence.json" --grid "$OUT/adherence.png"
  pack --exclude='ckpt-*' student lcm/state.json
  ;;
*) echo "phase a, b or c" >&2; exit 2 ;;
esac
