#!/usr/bin/env bash
# The embedded model's ControlNet on a GPU machine, and the adapters' device timings, as device calls of <= 10 minutes:
#
#   bash runtime/train/controlnet_on_device.sh train   # ControlNet stage (3000 x 512; time-boxed at CN_MINUTES, 8.5),
#                                                      # exported to $OUT/default_controlnet when it finishes
#   bash runtime/train/controlnet_on_device.sh eval    # 500 fresh masks (benchmarks/control_adherence.py) on the run's
#                                                      # model if this machine trained it, else runtime/default_controlnet
#   bash runtime/train/controlnet_on_device.sh bench   # LoRA switch under CUDA graphs (a UNet step and a whole fast-path
#                                                      # pipeline); ControlNet per-step cost vs diffusers (+ torch.compile);
#                                                      # SD1.5 at 512, fp16 (~3-5 min); carry .whl (diffusers, from
#                                                      # ../shared/tools/device_wheels.sh)
#   (phases can be chained: `... eval bench` runs both in one call)
#
# `train` run again resumes the stage: from the run folder if the machine is still warm, else from the parts of the
# previous call copied to $PARTS (default .carry/); the parts come back only when the stage did not finish (at most 8
# files come back from a call). The stage's settings are the recipe's (diffrt.train.recipes STAGES["controlnet"]);
# CN_STEPS=N overrides the step count. COMMIT=<sha> is recorded in the result files.
set -euo pipefail
OUT=${OUT:-/tmp/out}; RUN=${RUN:-/tmp/controlnet_run}; PARTS=${PARTS:-.carry}
mkdir -p "$OUT"
if ! python3 -c "import diffrt" 2>/dev/null; then
  # pip cannot build an editable install without the network (setuptools), so map the layout by symlinks instead.
  mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels \
    && ln -sfn "$PWD/export" runtime/export
  export PYTHONPATH=/tmp/pp:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

for PHASE in "${@:-train}"; do case $PHASE in
train)
  if [ ! -f "$RUN/controlnet/state.json" ] && ls "$PARTS"/controlnet_run.tgz.part-* >/dev/null 2>&1; then
    mkdir -p "$RUN" && cat "$PARTS"/controlnet_run.tgz.part-* | tar xzf - -C "$RUN"
  fi
  python3 -m diffrt.cli train controlnet "$RUN" --max-minutes "${CN_MINUTES:-8.5}" ${CN_STEPS:+--steps "$CN_STEPS"} \
    2>&1 | tee "$OUT/controlnet_train.log"
  if [ -f "$RUN/controlnet/model/config.json" ]; then
    cp -r "$RUN/controlnet/model" "$OUT/default_controlnet"
  else  # not finished: the run comes back in parts for the next call's resume
    tar czf - -C "$RUN" --exclude='.tmp-*' . | split -b 15m - "$OUT/controlnet_run.tgz.part-"
  fi
  ;;
eval)
  model="$RUN/controlnet/model"; [ -f "$model/config.json" ] || model=runtime/default_controlnet
  python3 benchmarks/control_adherence.py --controlnet "$model" --count "${PROMPTS:-500}" --commit "${COMMIT:-}" \
    --json "$OUT/control_adherence.json" --grid "$OUT/control_adherence.png" 2>&1 | tee "$OUT/control_adherence.log"
  ;;
bench)
  # diffusers (the peer) from the wheels of ../shared/tools/device_wheels.sh, carried as .whl
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-$PWD}
  timeout "${BENCH_S:-480}" python3 benchmarks/adapters.py --commit "${COMMIT:-}" --json "$OUT/adapters.json" 2>&1 \
    | tee "$OUT/adapters.log"
  ;;
*) echo "phases: train, eval, bench" >&2; exit 2 ;;
esac; done
