"""One UNet forward at batch 1, fp16, real architecture with random weights: diffrt's backends against diffusers.

Rows (one device call, same weights): diffusers eager (SDPA), diffrt eager on torch ops, diffrt eager on the Triton
kernels, and both diffrt backends replayed from a CUDA graph (how the runtime is meant to run). Each row has the
median and 20th/80th percentile ms, TFLOP/s against the FLOP count of ../shared/BENCHMARKING.md's table, and the
max relative error of its output against diffusers' fp32 forward on the same inputs.

    python benchmarks/unet.py --preset sd15 --size 512 --out benchmarks/results/unet_sd15_512_h100.json
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.accuracy import max_rel_error
from benchmarks.diffusers_configs import SD15, SD21, SDXL
from benchmarks.kernels import bench_eager, bench_graph, kernel_environment
from benchmarks.results_file import write_json
from diffrt.models.ops import TORCH_OPS, TRITON_OPS, set_ops
from diffrt.models.unet import UNet2DConditionModel, UNetConfig

GFLOP = {("sd15", 512): 803, ("sd15", 1024): 4674, ("sd21", 512): 803, ("sdxl", 1024): 6761, ("sdxl", 512): 1589}


UNET_TIMING = (
    "eager rows: triton.testing.do_bench(warmup=200 ms, rep=1000 ms); graph rows: CUDA-graph replays for ~1000 ms; "
    "L2 flushed before each repetition"
)


def inputs(cfg: UNetConfig, size: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    x = torch.randn(1, cfg.in_channels, lat, lat, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(1, pooled, generator=g),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)}  # fmt: skip
    return (x, torch.tensor(999.0), ctx), extra


def cuda_half(t: torch.Tensor) -> torch.Tensor:
    return t.cuda().half()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = UNetConfig.preset(args.preset)
    ours = UNet2DConditionModel(cfg).eval().requires_grad_(False)
    (x, t, ctx), extra = inputs(cfg, args.size)
    rows = []

    ref = None
    peer = None
    if not args.no_diffusers:
        from diffusers import UNet2DConditionModel as DiffusersUNet

        peer = DiffusersUNet(**{"sd15": SD15, "sd21": SD21, "sdxl": SDXL}[args.preset]).eval().requires_grad_(False)
        peer.load_state_dict(ours.state_dict())
        peer = peer.cuda()
        with torch.no_grad():  # fp32 reference on the GPU
            ref = peer(x.cuda(), t.cuda(), ctx.cuda(), added_cond_kwargs={k: v.cuda() for k, v in extra.items()}
                       or None).sample.float()  # fmt: skip
        peer = peer.half()
    ours = ours.cuda().half()
    xs, cs = cuda_half(x), cuda_half(ctx)
    es = {k: cuda_half(v) for k, v in extra.items()}
    tc = t.cuda()

    def record(name, fn, graph):
        set_ops(ours, TRITON_OPS if "triton" in name else TORCH_OPS)
        with torch.no_grad():
            out = fn().float()
            # A UNet forward takes tens of ms: time at least ~1 s so that the percentiles come from many repetitions.
            timing = bench_graph(fn, rep_ms=1000.0) if graph else bench_eager(fn, warmup=200, rep=1000)  # UNET_TIMING
        med, p20, p80 = timing
        flops = GFLOP.get((args.preset, args.size))
        row = {"name": name, "preset": args.preset, "component": "unet", "dtype": "float16", "batch": 1,
               "height": args.size, "width": args.size, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
               "tflops": flops / med if flops else None,
               "max_rel_error_vs_diffusers_fp32": max_rel_error(out, ref) if ref is not None else None}  # fmt: skip
        rows.append(row)
        print(f"{name:28s} {med:8.3f} ms  p20 {p20:.3f} p80 {p80:.3f}  err {row['max_rel_error_vs_diffusers_fp32']}")

    if peer is not None:
        added = es or None
        record("diffusers eager", lambda: peer(xs, tc, cs, added_cond_kwargs=added).sample, graph=False)
    t0 = time.time()
    for backend in ("torch", "triton"):
        record(f"diffrt {backend} eager", lambda: ours(xs, tc, cs, **es), graph=False)
        record(f"diffrt {backend} cuda-graph", lambda: ours(xs, tc, cs, **es), graph=True)
    print(f"diffrt rows took {time.time() - t0:.0f} s (including autotuning)")
    base = next((r for r in rows if r["name"] == "diffusers eager"), None)
    for r in rows:
        r["speedup_vs_diffusers_eager"] = base["median_ms"] / r["median_ms"] if base else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    env = {**kernel_environment(args.commit), "timing": UNET_TIMING}
    rows = [{**env, **r} for r in rows]  # every row names the GPU, versions and commit
    write_json(args.out, {"environment": env, "rows": rows}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
