#!/usr/bin/env bash
# One device call of the fast path's checks and latency harness, each stage time-boxed, logs and JSON under $OUT.
# Carry .whl (../shared/tools/device_wheels.sh: diffusers for the peers). Phases, one call each:
#   overhead: benchmarks/overhead.py (where an end-to-end call's time goes beyond its graph replays) at OVERHEAD_SIZE
#          (default 512) for ARCH (default sd21) and RUNS (default 1 step, LCM 4 steps), with TAESD if TINY_VAE=1;
#          then, unless EXTRAS=0, the VAE decoder's error and time in fp32/bf16/fp16 and the graph backend's GPU tests
#   convs: benchmarks/conv_shapes.py (each convolution shape of the VAE decode and UNet step of ARCH, timed several
#          ways) at CONV_SIZES (default 512,1024)
#   check: the GPU tests of the graph backend, backends, samplers and attention; time to first image cold/warm;
#          the harness for SD2.1 at 512 with every peer (a first ratio)
#   sd21 / sdxl / sd15: the harness for that architecture at 256..2048, peers at 512 and 1024 (sd21 first runs the
#   GPU tests unless TESTS=0); LATENCY_S sets the harness's time box, SIZES / PEER_SIZES / PEERS / RUNS / BATCHES /
#   PEER_BATCHES its cells (the peers run PEER_BATCHES, default 1; the compile peer recompiles for each)
#   kernels: the GPU tests of the kernels (autotuning, LayerNorm, GroupNorm statistics from the epilogue, epilogues),
#          the fast path against the fp32 reference with and without its latest optimizations
#          (tests/test_candidates_gpu.py), the backends and the graph backend; KERNEL_TESTS: other test files, each
#          its own stage of at most KERNEL_TEST_S seconds, KERNEL_TEST_K: a pytest -k expression for each of them
#   ablation: benchmarks/ablation.py (text encoders, UNet step, VAE, TAESD with each optimization off in turn) for
#          ABLATION_ARCHS (default sd21) at ABLATION_SIZES (default 512,1024); ABLATION_RUNS (e.g. "LCM 4 steps"):
#          generations timed end to end per variant too
#   candidates: the ablation of run 18's candidates (NOTES_kernels.md), both on since run 19 and each switched off here:
#          long self-attention on torch's SDPA and the VAE's wide-head softmax in one pass, for SD1.5 and SD2.1 at
#          CANDIDATE_SIZES (default 1024,512; at 1024² SD's first UNet level has 16384 queries); their GPU tests are
#          the kernels phase's (tests/test_candidates_gpu.py, test_softmax.py)
#   attention: benchmarks/attention_variants.py (every exponential mode of the attention kernel with each tile config
#          against SDPA at the UNets' shapes), the GPU tests of the modes, of programmatic dependent launch and of
#          the two residual candidates (ATTN_TEST_K), what a kernel boundary costs with and without PDL
#          (benchmarks/launch_gaps.py) and, unless ATTN_ABLATION=0, the ablation of all of them (ATTN_VARIANTS) for
#          ATTN_ARCHS (default sd21,sd15) at ATTN_SIZES (default 1024,512); the logs come back as attention_logs.tgz
#   profile: benchmarks/profile_components.py, kernel by kernel against the FLOP and weight-read floors, for PRESETS
#   (default "sd21 sdxl") at PROFILE_SIZES (default "512 1024"), a JSON each (minutes, a guess)
# Caches across calls (each machine starts bare): CACHES_OUT=1 packs Triton's and torch.compile's on-disk caches into
# $OUT/caches.tgz when under the 16 MiB a file may come back (else prints their sizes); a later call that carries
# .carry/caches.tgz (or CACHES_IN) starts with them, except the check phase, whose first image is meant cold. Rows
# say whether a cache was warm (the compile peer's inductor_cache_at_start, first_image.py's disk_cache).
# Usage:  COMMIT=<sha> bash benchmarks/latency_device.sh check
set -u
PHASE=${1:-check}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
# pip cannot build an editable install without the network (setuptools), so map the layout by symlinks instead.
mkdir -p /tmp/pp && ln -sfn "$PWD/runtime" /tmp/pp/diffrt && ln -sfn "$PWD/kernels" runtime/kernels && ln -sfn "$PWD/export" runtime/export
export PYTHONPATH=/tmp/pp:$PWD:/tmp/site PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
CACHES_IN=${CACHES_IN:-.carry/caches.tgz}
if [ "$PHASE" != check ] && [ -f "$CACHES_IN" ] && tar xzf "$CACHES_IN" -C /tmp; then
  echo "caches from $CACHES_IN: $(du -sh /tmp/diffrt-cache /tmp/inductor-cache 2>/dev/null | tr '\n' ' ')"
fi
pack_caches() {
  local dirs; dirs=$(cd /tmp && ls -d diffrt-cache inductor-cache 2>/dev/null)
  [ "${CACHES_OUT:-0}" = 1 ] && [ -n "$dirs" ] || return 0
  tar czf /tmp/caches.tgz -C /tmp $dirs
  local mib=$(( $(stat -c %s /tmp/caches.tgz) / 1048576 ))
  [ "$mib" -lt 16 ] && cp /tmp/caches.tgz "$OUT/caches.tgz"
  echo "caches packed: $mib MiB compressed ($(du -sh /tmp/diffrt-cache /tmp/inductor-cache 2>/dev/null | tr '\n' ' '))"
}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
stage() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log")"; }
C=${COMMIT:-unknown}
export DIFFRT_CALL=${DIFFRT_CALL:-$(date -u +%Y%m%dT%H%M%S)-$$}  # every row this call writes names it (ratios only within one call)
case $PHASE in
check)
  stage gpu_tests 160 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_cuda_graph.py tests/test_backends.py tests/test_samplers.py tests/test_attention.py
  grep -E "max abs|passed|failed|Error" "$OUT/gpu_tests.log" | tail -n 25
  stage first_cold 110 python3 benchmarks/first_image.py --arch sd21 --cache-dir /tmp/diffrt-cache --commit "$C" --out "$OUT/first_image_cold.json"
  stage first_warm 50 python3 benchmarks/first_image.py --arch sd21 --cache-dir /tmp/diffrt-cache --commit "$C" --out "$OUT/first_image_warm.json"
  export TRITON_CACHE_DIR=/tmp/diffrt-cache
  stage latency 215 python3 benchmarks/latency.py --archs sd21 --sizes 512 --peers eager,compile --runs "1 step,LCM 4 steps" --budget-s 190 --commit "$C" --out "$OUT/latency_check.json"
  ;;
overhead)
  export TRITON_CACHE_DIR=/tmp/diffrt-cache
  IFS=, read -ra runs <<< "${RUNS:-1 step,LCM 4 steps}"
  arch=${ARCH:-sd21}; size=${OVERHEAD_SIZE:-512}; name=${arch}_${size}${TINY_VAE:+_taesd}
  for run in "${runs[@]}"; do
    stage "overhead_${name}_${run// /_}" ${OVERHEAD_S:-150} python3 benchmarks/overhead.py --arch "$arch" --size "$size" --run "$run" ${TINY_VAE:+--tiny-vae} --repeats ${OVERHEAD_REPEATS:-30} --commit "$C" --out "$OUT/overhead_${name}_${run// /_}.json"
    sed -n '1,60p' "$OUT/overhead_${name}_${run// /_}.log"
  done
  [ "${EXTRAS:-1}" = 1 ] || exit 0
  stage vae_precision 120 python3 benchmarks/vae_precision.py --archs sdxl,sd21 --sizes 512,1024 --commit "$C" --out "$OUT/vae_precision.json"
  cat "$OUT/vae_precision.log"
  stage gpu_tests 150 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_cuda_graph.py
  grep -E "max abs|passed|failed|Error" "$OUT/gpu_tests.log" | tail -n 12
  ;;
kernels)
  # One stage per test file, each in its own time box (KERNEL_TEST_S, default 150 s), so that a slow file cannot cut
  # the others' summaries; -x: the first failure prints its traceback at once.
  for file in ${KERNEL_TESTS:-tests/test_autotune.py tests/test_layer_norm.py tests/test_group_stats.py tests/test_bias_add.py tests/test_geglu.py tests/test_geglu_linear.py tests/test_upsample.py tests/test_upsample_conv.py tests/test_softmax.py tests/test_candidates_gpu.py tests/test_backends.py tests/test_cuda_graph.py}; do
    name=$(basename "$file" .py)
    stage "$name" ${KERNEL_TEST_S:-150} python3 -m pytest -q -x --tb=short -m gpu -p no:cacheprovider -s ${KERNEL_TEST_K:+-k "$KERNEL_TEST_K"} "$file"
    grep -E "max abs|passed|failed|Error" "$OUT/$name.log" | tail -n 12
  done
  ;;
convs)
  # benchmarks/conv_shapes.py: every convolution of the VAE decode and the UNet step by shape, against other ways of
  # running it (cudnn.benchmark, NCHW, 1x1 as GEMM, a padded 3-channel output)
  stage conv_tests 120 python3 -m pytest -q -x --tb=short -m gpu -p no:cacheprovider tests/test_conv_shapes.py
  tail -n 3 "$OUT/conv_tests.log"
  stage conv_shapes ${CONVS_S:-240} python3 benchmarks/conv_shapes.py --preset "${ARCH:-sd21}" --components "${CONV_COMPONENTS:-vae_decode,unet_step}" --sizes "${CONV_SIZES:-512,1024}" --commit "$C" --out "$OUT/conv_shapes_${ARCH:-sd21}.json"
  cat "$OUT/conv_shapes.log"
  ;;
candidates)
  # The ablation of the candidates against the fast path (their GPU tests: the kernels phase, in the call before)
  export TRITON_CACHE_DIR=/tmp/diffrt-cache
  stage ablation ${ABLATION_S:-330} python3 benchmarks/ablation.py --archs sd21,sd15 --sizes "${CANDIDATE_SIZES:-1024,512}" --variants "diffrt,- SDPA for long self-attention,- wide-head softmax in one pass" --budget-s $(( ${ABLATION_S:-330} - 25 )) --commit "$C" --out "$OUT/ablation.json"
  cat "$OUT/ablation.md" 2>/dev/null
  ;;
ablation)
  export TRITON_CACHE_DIR=/tmp/diffrt-cache
  stage ablation ${ABLATION_S:-240} python3 benchmarks/ablation.py --archs "${ABLATION_ARCHS:-sd21}" --sizes "${ABLATION_SIZES:-512,1024}" ${ABLATION_VARIANTS:+--variants "$ABLATION_VARIANTS"} --runs "${ABLATION_RUNS:-}" --budget-s $(( ${ABLATION_S:-240} - 30 )) --commit "$C" --out "$OUT/ablation.json"
  cat "$OUT/ablation.md" 2>/dev/null
  ;;
attention)
  # the sweep first: its 12 processes compile the kernel's variants into Triton's cache, which the tests and the
  # ablation then reuse
  export TRITON_CACHE_DIR=/tmp/diffrt-cache
  stage attention_variants ${VARIANTS_S:-200} python3 benchmarks/attention_variants.py --shapes "${VARIANT_SHAPES:-0,2,3,4,6,1,7,8,5}" --precompile 12 --budget-s $(( ${VARIANTS_S:-200} - 50 )) --commit "$C" --out "$OUT/attention_variants.json"
  cat "$OUT/attention_variants.log"
  stage attention_tests ${ATTN_TEST_S:-100} python3 -m pytest -q --tb=short -m gpu -p no:cacheprovider -k "${ATTN_TEST_K:-exponential or pdl or joint_block_biases or group_norm_plus}" tests/test_attention.py tests/test_grid_dependency.py tests/test_candidates_gpu.py
  grep -E "passed|failed|Error" "$OUT/attention_tests.log" | tail -n 12
  stage launch_gaps 40 python3 benchmarks/launch_gaps.py --commit "$C" --out "$OUT/launch_gaps.json"
  cat "$OUT/launch_gaps.log"
  if [ "${ATTN_ABLATION:-1}" = 1 ]; then
    stage ablation ${ABLATION_S:-230} python3 benchmarks/ablation.py --archs "${ATTN_ARCHS:-sd21,sd15}" --sizes "${ATTN_SIZES:-1024,512}" --variants "${ATTN_VARIANTS:-diffrt,+ half2 exponentials and long self-attention,+ split exponentials and long self-attention,+ programmatic dependent launch,+ block biases in joint passes,+ transformer residual in its GEMM}" --budget-s $(( ${ABLATION_S:-230} - 25 )) --commit "$C" --out "$OUT/ablation.json"
    cat "$OUT/ablation.md" 2>/dev/null
  fi
  # at most 8 files come back: the logs in one archive
  tar czf "$OUT/attention_logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log) && rm -f "$OUT"/*.log
  ;;
profile)
  for preset in ${PRESETS:-sd21 sdxl}; do for size in ${PROFILE_SIZES:-512 1024}; do
    stage "profile_${preset}_$size" 150 python3 benchmarks/profile_components.py --preset "$preset" --size "$size" \
      --commit "$C" --json "$OUT/profile_${preset}_$size.json"
  done; done
  tar czf "$OUT/profile_logs.tgz" -C "$OUT" $(cd "$OUT" && ls profile_*.log) && rm -f "$OUT"/profile_*.log
  ;;
sd21|sdxl|sd15)
  export TRITON_CACHE_DIR=/tmp/diffrt-cache
  # the compile peer's recompiles and their guards in latency.log (a row's graphs_compiled says how many, this why)
  export TORCH_LOGS=${TORCH_LOGS:-recompiles}
  if [ "$PHASE" = sd21 ] && [ "${TESTS:-1}" = 1 ]; then
    stage gpu_tests 90 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_cuda_graph.py tests/test_backends.py tests/test_samplers.py tests/test_attention.py
    grep -E "max abs|passed|failed|Error" "$OUT/gpu_tests.log" | tail -n 12
  fi
  stage latency ${LATENCY_S:-470} python3 benchmarks/latency.py --archs "$PHASE" --sizes "${SIZES:-256,512,768,1024,1536,2048}" --peer-sizes "${PEER_SIZES:-512,1024}" --peers "${PEERS:-eager,compile}" --runs "${RUNS:-1 step,LCM 4 steps}" --batches "${BATCHES:-1}" --peer-batches "${PEER_BATCHES:-1}" --budget-s $(( ${LATENCY_S:-470} - 25 )) --commit "$C" --out "$OUT/latency_$PHASE.json"
  ;;
esac
pack_caches
tail -n 40 "$OUT/latency"*.md 2>/dev/null
