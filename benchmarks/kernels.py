"""Kernel roofline benchmark: our Triton GroupNorm(+SiLU) and attention against torch at every UNet shape.

For each shape in benchmarks/kernel_shapes.py (SD1.5, SD2.1, SDXL UNets at 512² and 1024², batch 1, fp16; plus the
SD VAE decoder's norms, which are the ones larger than L2) it times, with triton.testing.do_bench (L2 flushed before
each repetition; median, 20th and 80th percentiles):
- group_norm: ours (auto, and the fused and split algorithms forced) vs F.group_norm + F.silu, NCHW and
  channels-last; GB/s counting one read of x and one write of y, against the measured device-to-device copy rate.
- attention: ours vs F.scaled_dot_product_attention with torch's default choice (the kernels it ran are recorded)
  and with each of the flash, memory-efficient and cuDNN backends forced; TFLOP/s counting 4*B*H*Sq*Sk*D.
q/k/v come from fused QKV / KV projection outputs ([B, S, 3, H, D] views), as in the UNet; torch gets the same
views transposed to [B, H, S, D].

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json
    python benchmarks/kernels.py --precompile 8   # compile every config in 8 processes first, then benchmark
"""

import argparse
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment
from benchmarks.kernel_shapes import all_unet_shapes, all_vae_norm_shapes, long_prompt_shapes
from benchmarks.results_file import write_json
from diffrt.kernels import attention as attn_mod
from diffrt.kernels import group_norm as gn_mod
from diffrt.kernels.attention import attention
from diffrt.kernels.group_norm import group_norm, group_norm_reference

L2_BYTES = 50 * 2**20  # H100 SXM
DEVICE = "cuda"  # the smoke test in tests/ swaps in "cpu" (interpreter) to exercise the row code


def bench_eager(fn, warmup=10, rep=60) -> tuple[float, float, float]:
    """(median, p20, p80) ms of eager calls: triton.testing.do_bench, L2 flushed before each. Includes whatever host
    (Python launch) time the GPU waits for: at microsecond kernels that is most of it."""
    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def bench_graph(fn, rep_ms=40.0) -> tuple[float, float, float] | None:
    """(median, p20, p80) ms of one CUDA-graph replay of fn, L2 flushed (256 MB memset) before each replay, as the
    runtime runs the UNet (captured graphs). None where fn cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile, autotune and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    n = int(min(1000, max(30, rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])
    med, p20, p80 = torch.quantile(times, torch.tensor([0.5, 0.2, 0.8])).tolist()
    del graph
    return med, p20, p80


def bench(fn) -> dict:
    """Both timings: 'graph' (the headline: GPU time as the runtime sees it) and 'eager' (do_bench)."""
    graph = bench_graph(fn)
    eager = bench_eager(fn)
    out = {"eager_median_ms": eager[0], "eager_p20_ms": eager[1], "eager_p80_ms": eager[2]}
    src = graph if graph is not None else eager
    out.update(median_ms=src[0], p20_ms=src[1], p80_ms=src[2], timing="cuda_graph" if graph is not None else "eager")
    return out


def copy_bandwidth_gbps() -> float:
    src = torch.randn(2**29, device=DEVICE, dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    med, _, _ = bench_eager(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / med / 1e6


def _gn_inputs(shape, dtype=torch.float16, channels_last=False):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn((1, shape.channels, shape.height, shape.width), device=DEVICE, dtype=dtype, generator=g) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape.channels, device=DEVICE, dtype=dtype, generator=g) * 0.5 + 1
    b = torch.randn(shape.channels, device=DEVICE, dtype=dtype, generator=g) * 0.5
    return x, w, b


def _attn_inputs(shape, batch=1, dtype=torch.float16):
    """Same construction as tests/test_attention.py: views into fused projection outputs."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b, sq, sk, h, d = batch, shape.seq_q, shape.seq_k, shape.heads, shape.head_dim
    if sq == sk:
        qkv = torch.randn(b, sq, 3, h, d, device=DEVICE, dtype=dtype, generator=g)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(b, sq, h, d, device=DEVICE, dtype=dtype, generator=g)
    kv = torch.randn(b, sk, 2, h, d, device=DEVICE, dtype=dtype, generator=g)
    return q, kv[:, :, 0], kv[:, :, 1]


def _torch_kernels(fn) -> list[str]:
    """Names of the CUDA kernels one call of fn launches (which SDPA backend torch picked)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(n[:90] for n in names)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }


def _peer_fields(t: dict, prefix: str = "peer_") -> dict:
    return {prefix + k: v for k, v in t.items()}


def bench_group_norm(shapes: dict, copy_gbps: float, log) -> list[dict]:
    rows = []
    for shape, used_by in shapes.items():
        nbytes = 2 * shape.channels * shape.height * shape.width * 2  # read x + write y, fp16
        hw = shape.height * shape.width
        for channels_last in (False, True):
            x, w, b = _gn_inputs(shape, channels_last=channels_last)
            ref = {"eps": shape.eps, "silu": shape.silu}
            t_torch = bench(partial(group_norm_reference, x, shape.groups, w, b, **ref))
            impls = ("auto",) if channels_last else ("auto", "fused", "split")
            for algo in impls:
                t = bench(partial(group_norm, x, shape.groups, w, b, **ref, algorithm=algo))
                chosen = gn_mod._choose_algorithm(1, shape.channels, shape.groups, hw) if algo == "auto" else algo
                if chosen == "fused":
                    config = str(gn_mod._group_norm_fused_kernel.best_config)
                else:
                    stats, apply = gn_mod._group_norm_stats_kernel, gn_mod._group_norm_apply_kernel
                    config = f"stats {stats.best_config}; apply {apply.best_config}"
                row = {
                    "component": "group_norm",
                    "op": "group_norm+silu" if shape.silu else "group_norm",
                    "used_by": used_by,
                    "shape": shape.label,
                    "batch": 1,
                    "channels": shape.channels,
                    "height": shape.height,
                    "width": shape.width,
                    "groups": shape.groups,
                    "dtype": "float16",
                    "layout": "channels_last" if channels_last else "nchw",
                    "backend": f"triton_{algo}",
                    "algorithm": chosen,
                    "config": config,
                    **t,
                    "gbps": nbytes / t["median_ms"] / 1e6,
                    "frac_copy_bw": nbytes / t["median_ms"] / 1e6 / copy_gbps,
                    "larger_than_l2": nbytes / 2 > L2_BYTES,
                    "peer_backend": "torch F.group_norm" + (" + F.silu" if shape.silu else ""),
                    **_peer_fields(t_torch),
                    "speedup_vs_peer": t_torch["median_ms"] / t["median_ms"],
                    "speedup_vs_peer_eager": t_torch["eager_median_ms"] / t["eager_median_ms"],
                }
                rows.append(row)
                log(
                    f"GN {shape.label:26s} {row['layout'][:5]:5s} {algo:5s}({chosen:5s}) {t['median_ms'] * 1e3:7.1f} us"
                    f" torch {t_torch['median_ms'] * 1e3:7.1f} us x{row['speedup_vs_peer']:5.2f} "
                    f"{row['gbps']:5.0f} GB/s ({row['frac_copy_bw']:4.0%}) | eager {t['eager_median_ms'] * 1e3:6.1f}"
                    f" vs {t_torch['eager_median_ms'] * 1e3:6.1f} us | {t['timing']}"
                )
    return rows


def bench_attention(shapes: dict, log) -> list[dict]:
    rows = []
    backends = _sdpa_backends()
    from torch.nn.attention import sdpa_kernel

    for shape, used_by in shapes.items():
        q, k, v = _attn_inputs(shape)
        sdpa = partial(F.scaled_dot_product_attention, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        flops = 4 * shape.heads * shape.seq_q * shape.seq_k * shape.head_dim
        t_ours = bench(partial(attention, q, k, v))
        single = shape.seq_k <= attn_mod.SINGLE_BLOCK_MAX_KEYS
        config = str((attn_mod._attention_single if single else attn_mod._attention_loop).best_config)
        peers = {"default": bench(sdpa)}
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    sdpa()
                    peers[name] = bench(sdpa)
            except RuntimeError as e:
                peers[name] = None
                log(f"   {shape.label}: SDPA backend {name} unavailable: {str(e).splitlines()[0][:120]}")
        default_kernels = _torch_kernels(sdpa)
        best_name = min((n for n in peers if peers[n] is not None), key=lambda n: peers[n]["median_ms"])
        best = peers[best_name]
        row = {
            "component": "attention",
            "op": "self" if shape.seq_q == shape.seq_k else "cross",
            "used_by": used_by,
            "shape": shape.label,
            "batch": 1,
            "seq_q": shape.seq_q,
            "seq_k": shape.seq_k,
            "heads": shape.heads,
            "head_dim": shape.head_dim,
            "dtype": "float16",
            "backend": "triton",
            "config": config,
            **t_ours,
            "tflops": flops / t_ours["median_ms"] / 1e9,
            "peers": peers,
            "torch_default_kernels": default_kernels,
            "peer_backend": f"sdpa_{best_name}",
            **_peer_fields(best),
            "peer_tflops": flops / best["median_ms"] / 1e9,
            "speedup_vs_peer": best["median_ms"] / t_ours["median_ms"],
        }
        rows.append(row)
        others = " ".join(
            f"{n}=" + ("-" if t is None else f"{t['median_ms'] * 1e3:.1f}") for n, t in peers.items() if n != best_name
        )
        log(
            f"ATTN {shape.label:30s} ours {t_ours['median_ms'] * 1e3:7.1f} us {row['tflops']:5.0f} TF/s | best "
            f"{best_name:9s} {best['median_ms'] * 1e3:7.1f} us x{row['speedup_vs_peer']:5.2f} | {others} | "
            f"{config} | default ran {', '.join(k[:36] for k in default_kernels)}"
        )
    return rows


def warm_all(only: str | None = None, match: str = "") -> None:
    """Run every kernel variant the GPU tests and this benchmark use once (compiles into Triton's disk cache)."""
    norms, attns = all_unet_shapes()
    if only == "attention":
        norms = {}
    if only == "group_norm":
        attns = {}
    attns = {s: u for s, u in attns.items() if match in s.label}
    vae = all_vae_norm_shapes() if only != "attention" else {}
    for shape in list(norms) + [s for s in vae if s not in norms]:
        for channels_last in (False, True):
            x, w, b = _gn_inputs(shape, channels_last=channels_last)
            for algo in ("auto", "fused", "split"):
                group_norm(x, shape.groups, w, b, shape.eps, silu=shape.silu, algorithm=algo, out=torch.empty_like(x))
    variants = [s for s in norms if s.silu and (s.channels, s.height) in {(320, 64), (1280, 8), (960, 128)}]
    for shape in variants:
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                x, w, b = _gn_inputs(shape, dtype, channels_last)
                for algo in ("fused", "split"):
                    group_norm(x, shape.groups, w, b, shape.eps, silu=True, algorithm=algo, out=torch.empty_like(x))
    for shape in list(attns) + [s for s in long_prompt_shapes() if only != "group_norm" and match in s.label]:
        attention(*_attn_inputs(shape))
    for shape in [s for s in attns if s.seq_q in (1024, 4096)]:
        attention(*_attn_inputs(shape, batch=2, dtype=torch.bfloat16))
    torch.cuda.synchronize()


def precompile(workers: int, extra: list[str]) -> None:
    """Compile every autotuning config in parallel: worker i pins config i of each kernel (DIFFRT_TRITON_CONFIG)."""
    t0 = time.time()
    procs = []
    for i in range(workers):
        env = {**os.environ, "DIFFRT_TRITON_CONFIG": str(i)}
        cmd = [sys.executable, __file__, "--warm-only", *extra]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE))
    for i, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode != 0:
            print(f"precompile worker {i} failed (rc {p.returncode}): {err.decode()[-2000:]}", flush=True)
    print(f"precompile: {workers} workers in {time.time() - t0:.0f} s", flush=True)


def kernel_environment(commit: str | None) -> dict:
    return {
        **environment(commit),
        "dtype": "float16",
        "batch": 1,
        "timing": "triton.testing.do_bench(warmup=10 ms, rep=60 ms), L2 flushed before each repetition",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kernels.json", help="JSON file to write")
    ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    ap.add_argument("--precompile", type=int, default=0, help="compile all configs in this many processes first")
    ap.add_argument("--warm-only", action="store_true", help="only run each kernel variant once (compile)")
    ap.add_argument("--only", choices=["group_norm", "attention", "none"], default=None, help="none: precompile only")
    ap.add_argument("--match", default="", help="only attention shapes whose label contains this")
    ap.add_argument("--precompile-only", choices=["group_norm", "attention"], default=None, help="limit precompile")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    if args.warm_only:
        warm_all(args.precompile_only, args.match)
        return
    if args.precompile:
        extra = ["--match", args.match] + (["--precompile-only", args.precompile_only] if args.precompile_only else [])
        precompile(args.precompile, extra)
    if args.only == "none":
        return

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    env = kernel_environment(args.commit)
    copy_gbps = copy_bandwidth_gbps()
    log(f"{env['gpu']} driver {env['driver']} torch {env['torch']} triton {env['triton']} commit {env['commit']}")
    log(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    norms, attns = all_unet_shapes()
    all_norms = dict(norms)
    for s, u in all_vae_norm_shapes().items():
        all_norms[s] = all_norms.get(s, []) + u
    rows = []
    t0 = time.time()
    if args.only in (None, "group_norm"):
        rows += bench_group_norm(all_norms, copy_gbps, log)
    if args.only in (None, "attention"):
        long = {s: ["long prompts (154 tokens)"] for s in long_prompt_shapes()}
        rows += bench_attention({s: u for s, u in {**attns, **long}.items() if args.match in s.label}, log)
    log(f"benchmark: {len(rows)} rows in {time.time() - t0:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**env, "copy_gbps": copy_gbps}
    rows = [{**env, **r} for r in rows]  # every row names the GPU, versions and commit
    write_json(out, {"environment": env, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
