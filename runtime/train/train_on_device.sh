#!/usr/bin/env bash
# The embedded model's training on a GPU machine in three phases, each sized for one 10-minute device call on a fresh
# machine, each ending with its run folder packed under $OUT (tar.gz in 15 MiB parts) for the next phase:
#
#   bash runtime/train/train_on_device.sh a   # VAE (6960 steps, 4.5 min on an H100), tokenizer + text encoder (1 min)
#   bash runtime/train/train_on_device.sh b   # UNet, the teacher (3206 steps, 8.6 min)
#   bash runtime/train/train_on_device.sh c   # LCM distillation (1039 steps, 4.2 min), export, adherence benchmark
#
# Phases b and c start from the previous phase's parts copied to $PARTS (default .carry/) unless the run folder is
# still there (a warm machine). Step counts and settings are the recipe's defaults (diffrt.train.recipes.STAGES);
# --max-minutes only guards the call's limit: a stage stopped by it resumes when its phase runs again on the same
# machine. PROFILE=1 in phase a first times the training steps (benchmarks/train_step.py). COMMIT=<sha> is recorded in
# the result files (the device's copy of the tree may carry stale git metadata).
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
pack() { tar czf - -C "$RUN" --exclude='.tmp-*' "$@" | split -b 15m - "$OUT/run_$PHASE.tgz.part-"; }
unpack() { mkdir -p "$RUN" && cat "$PARTS"/run_"$1".tgz.part-* | tar xzf - -C "$RUN"; }

case $PHASE in
a)
  if [ "${PROFILE:-0}" = 1 ]; then
    python3 benchmarks/train_step.py --unet-batches 256 1024 --vae-batches 64 256 --reps 10 --commit "${COMMIT:-}" \
      --json "$OUT/train_step.json"
  fi
  train vae "$RUN" --preset "$PRESET" --max-minutes 7 ${VAE_STEPS:+--steps "$VAE_STEPS"}
  train text "$RUN" --max-minutes 1.5 ${TEXT_STEPS:+--steps "$TEXT_STEPS"}
  pack .
  ;;
b)
  [ -f "$RUN/text/model/config.json" ] || unpack a
  train unet "$RUN" --max-minutes 9 ${UNET_STEPS:+--steps "$UNET_STEPS"}
  pack --exclude='ckpt-*' .
  ;;
c)
  [ -f "$RUN/unet/model/config.json" ] || unpack b
  train lcm "$RUN" --max-minutes 6 ${LCM_STEPS:+--steps "$LCM_STEPS"}
  train export "$RUN" "$RUN/student" --max-mb 30
  train export "$RUN" "$RUN/teacher" --teacher
  python3 benchmarks/adherence.py --teacher "$RUN/teacher" --student "$RUN/student" --prompts "${PROMPTS:-500}" \
    --commit "${COMMIT:-}" --json "$OUT/adherence.json" --grid "$OUT/adherence.png"
  pack --exclude='ckpt-*' student lcm/state.json
  ;;
*) echo "phase a, b or c" >&2; exit 2 ;;
esac
