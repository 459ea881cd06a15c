"""The autotuning policy shared by the kernels: short timings, disk-cached choices, one config when interpreted."""

import inspect
import os

import torch
import triton

# Under Triton's CPU interpreter nothing can be timed: each kernel keeps only its first config (fast CPU tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
# DIFFRT_TRITON_CONFIG=i keeps only the i-th config that survives pruning (modulo their count). Processes pinned to
# different i compile the configs in parallel into Triton's disk cache before one process autotunes over all of
# them (benchmarks/kernels.py --precompile); it is also a way to reproduce one config's behaviour.
_PIN = os.environ.get("DIFFRT_TRITON_CONFIG")
_HAS_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def _short_bench(kernel_call, quantiles):
    # The UNet's kernels take microseconds, so eager timing would measure the host's launch overhead: time
    # CUDA-graph replays (as the runtime runs them), and fall back to plain events where capture fails.
    # do_bench_cudagraph times on a new stream that does not wait for the caller's, and a shape's first call tunes
    # right after its producer (a convolution) was launched there. Its timed runs would read, and for a kernel in
    # place (`restore`) clone and write back, a tensor still being written: output that lands between a run's
    # clone and its restore is reverted, and the real call reads stale memory. The likely cause of the real SD VAE
    # decoder's 1024px test failing on some bare machines (tests/test_backends.py; NOTES_kernels run 15). So the
    # caller's work is waited for first (once per shape and config set: tuning runs only on a shape's first call).
    if not torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(kernel_call, rep=10, quantiles=quantiles)
    except RuntimeError:
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def make_early_prune(prune=None):
    """Triton's early_config_prune hook: named_args holds the positional arguments, kwargs the keyword ones."""

    def early_prune(cfgs, named_args, **kwargs):
        kept = prune(cfgs, {**named_args, **kwargs}) if prune is not None else list(cfgs)
        return [kept[int(_PIN) % len(kept)]] if _PIN is not None else kept

    return early_prune


def autotune(configs: list, key: list[str], prune=None, restore: tuple[str, ...] = ()):
    """triton.autotune over `configs`, keyed (and cached on disk) per `key` values and argument dtypes.

    prune(configs, args) gets every kernel argument by name (positional and keyword) and returns the configs to try.
    `restore` names the arguments a run modifies in place that it also reads: they are restored after each timed
    run, so the call that autotunes returns the same result as any other.
    """
    if INTERPRET:
        configs = configs[:1]
    extra = {"cache_results": True} if _HAS_CACHE_RESULTS else {}
    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": make_early_prune(prune)},
        do_bench=_short_bench,
        restore_value=list(restore),
        **extra,
    )
