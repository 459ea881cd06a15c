"""The attention kernel's exponential modes and tile configs, one by one, against torch's SDPA at the UNets' shapes.

At head dim 64 the softmax's exponentials cost a Hopper SM about as long as the two matrix products
(kernels/attention.py), so this sweep times every exponential mode (EXP2_MODES) with each tile config pinned (no
autotuning), next to the autotuned default and SDPA's cuDNN and flash kernels, on the self- and cross-attention shapes
of SD1.5, SD2.1 and SDXL (batch 1, fp16, q/k/v as views of a fused projection, as the UNet makes them). Each row has
its CUDA-graph replay time (median of triton's do_bench_cudagraph), TFLOP/s counting 4*B*H*Sq*Sk*D, and its max abs
error against an fp32 reference beside SDPA's own fp16 error.

    python benchmarks/attention_variants.py --out benchmarks/results/attention_variants_h200.json --precompile 12

--precompile N compiles every variant in N processes into Triton's disk cache first (each runs its share once).
Rows are written after each shape, so a call cut off by its time limit keeps what it measured.
"""

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment
from benchmarks.results_file import write_json
from diffrt.kernels import attention as attn_mod

# (label, Sq, Sk, heads, head dim), most time first: SD2.1's first level at 1024² is 5 of its step's 12 ms.
SHAPES = [
    ("sd21 1024 L1 self", 16384, 16384, 5, 64),
    ("sd21 1024 L2 / sdxl 1024 L1 self", 4096, 4096, 10, 64),
    ("sd21 512 L1 self", 4096, 4096, 5, 64),
    ("sd15 1024 L1 self", 16384, 16384, 8, 40),
    ("sd15 512 L1 self", 4096, 4096, 8, 40),
    ("sdxl 1024 L2 self", 1024, 1024, 20, 64),
    ("sd21 1024 L1 cross", 16384, 77, 5, 64),
    ("sd21 512 L1 cross", 4096, 77, 5, 64),
    ("sd15 512 L1 cross", 4096, 77, 8, 40),
]
# (BLOCK_M, BLOCK_N, warps, stages): the kernel's own loop tiles, shallower pipelines, and 256 query rows over two
# warpgroups (FlashAttention-3's ratio of rows to warps on Hopper)
LOOP_TILES = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (256, 64, 8, 2)]
SINGLE_TILES = [(128, 8), (64, 4)]


def configs_for(sk: int, head_dim: int) -> list[triton.Config]:
    """The pinned configs of one shape: the kernel's own fit rules, both head-dim splits where the dim is no power
    of two."""
    single = sk <= attn_mod.SINGLE_BLOCK_MAX_KEYS
    splits = (False,) if triton.next_power_of_2(head_dim) == head_dim else (True, False)
    out = []
    for split in splits:
        if single:
            tiles = [({"BLOCK_M": bm}, w, 1) for bm, w in SINGLE_TILES]
        else:
            tiles = [({"BLOCK_M": bm, "BLOCK_N": bn}, w, st) for bm, bn, w, st in LOOP_TILES]
        out += [triton.Config({**kw, "SPLIT_D": split}, num_warps=w, num_stages=st) for kw, w, st in tiles]
    args = {"HEAD_DIM": head_dim, "SK": sk}
    return [c for c in out if attn_mod._fits(c, args, single)]


def qkv_views(sq: int, sk: int, heads: int, head_dim: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if sq == sk:
        qkv = torch.randn(1, sq, 3, heads, head_dim, device="cuda", generator=g).half()
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(1, sq, heads, head_dim, device="cuda", generator=g).half()
    kv = torch.randn(1, sk, 2, heads, head_dim, device="cuda", generator=g).half()
    return q, kv[:, :, 0], kv[:, :, 1]


def reference_fp32(q, k, v) -> torch.Tensor:
    """fp32 attention head by head (a 16384 x 16384 fp32 score matrix per head at most)."""
    heads = range(q.shape[2])
    return torch.cat([attn_mod.attention_reference(*(t[:, :, i : i + 1].float() for t in (q, k, v))) for i in heads], 2)


def variants(sk: int, head_dim: int):
    """(name, exp2 mode, config or None for the autotuned kernel) of one shape."""
    yield "diffrt autotuned (mufu)", "mufu", None
    for mode, cfg in itertools.product(attn_mod.EXP2_MODES, configs_for(sk, head_dim)):
        kw = cfg.kwargs
        tile = f"{kw['BLOCK_M']}x{kw.get('BLOCK_N', 'all')} w{cfg.num_warps} s{cfg.num_stages}"
        yield f"{mode} {tile}{' split-d' if kw['SPLIT_D'] else ''}", mode, cfg


def sdpa(backend):
    def run(q, k, v):
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    return run


SDPA = {
    "sdpa cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    "sdpa flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
}


def time_ms(fn) -> tuple[float, float, float]:
    """(median, p20, p80) ms of CUDA-graph replays; fn has run once already (compiled, autotuned)."""
    med, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=60, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def measure_shape(label, sq, sk, heads, head_dim, compile_only=False, share=None) -> list[dict]:
    q, k, v = qkv_views(sq, sk, heads, head_dim)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ref = None if compile_only else reference_fp32(q, k, v)
    flop = 4 * heads * sq * sk * head_dim
    runs = [(name, (lambda m, c: lambda: attn_mod.attention(q, k, v, out=out, exp2=m, config=c))(mode, cfg))
            for name, mode, cfg in variants(sk, head_dim)]  # fmt: skip
    runs += [(name, (lambda f: lambda: f(q, k, v))(sdpa(b))) for name, b in SDPA.items()]
    rows = []
    for i, (name, fn) in enumerate(runs):
        if share is not None and i % share[1] != share[0]:
            continue
        row = {"shape": label, "seq_q": sq, "seq_k": sk, "heads": heads, "head_dim": head_dim, "variant": name}
        try:
            result = fn()
            if compile_only:
                continue
            torch.cuda.synchronize()
            row["max_abs_error"] = (result.float() - ref).abs().max().item()
            row["nan"] = bool(torch.isnan(result).any().item())
            med, p20, p80 = time_ms(fn)
            row.update(ms=med, p20_ms=p20, p80_ms=p80, tflops=flop / med / 1e9)
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run is a row, not the end
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return rows


def precompile(n: int, shapes) -> None:
    t0 = time.time()
    worker = [sys.executable, __file__, "--shapes", ",".join(str(j) for j in shapes), "--compile-only"]
    procs = [subprocess.Popen([*worker, f"{i}/{n}"]) for i in range(n)]
    codes = [p.wait() for p in procs]
    print(f"precompiled in {n} processes, {time.time() - t0:.0f} s, exit codes {codes}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/attention_variants.json")
    ap.add_argument("--precompile", type=int, default=0)
    ap.add_argument("--compile-only", default=None, help="i/n: compile this process's share and exit")
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))), help="indices into SHAPES")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop before a shape that would start after this")
    ap.add_argument("--commit", default=None, help="the commit the call runs (the device's git metadata may be stale)")
    args = ap.parse_args()
    shapes = [int(i) for i in args.shapes.split(",")]
    if args.compile_only:
        i, n = (int(x) for x in args.compile_only.split("/"))
        for j in shapes:
            measure_shape(*SHAPES[j], compile_only=True, share=(i, n))
        return
    t0 = time.time()
    if args.precompile:
        precompile(args.precompile, shapes)
    env = environment(args.commit)
    rows = []
    for j in shapes:
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: {SHAPES[j][0]} and later not measured", flush=True)
            break
        for row in measure_shape(*SHAPES[j]):
            rows.append({**env, **row})
        write_json(args.out, rows)
        best = {}
        for r in rows:
            if r["shape"] == SHAPES[j][0] and "ms" in r:
                family = r["variant"].split(" ")[0] if not r["variant"].startswith("sdpa") else r["variant"]
                if family not in best or r["ms"] < best[family]["ms"]:
                    best[family] = r
        label, sq, sk, heads, head_dim = SHAPES[j]
        print(f"\n{label} (Sq {sq}, Sk {sk}, H {heads}, D {head_dim}), the fastest of each family:", flush=True)
        for r in sorted(best.values(), key=lambda r: r["ms"]):
            err = r["max_abs_error"]
            print(f"  {r['variant']:<40} {r['ms']:.4f} ms {r['tflops']:6.1f} TFLOP/s  err {err:.2e}", flush=True)
        failed = [r for r in rows if r["shape"] == SHAPES[j][0] and "error" in r]
        for r in failed:
            print(f"  FAILED {r['variant']}: {r['error']}", flush=True)
    print(f"wrote {len(rows)} rows to {args.out} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
