"""What one kernel boundary costs inside a CUDA graph, with and without programmatic dependent launch.

A chain of N dependent launches of the LayerNorm kernel on a small tensor (SDXL's 16² level at batch 1: 256 rows of
1280, a few microseconds of work, as most of a batch-1 UNet step's kernels) is captured and replayed; what the time
per launch loses with PDL is what the boundary cost beyond the overlap. The chain runs twice: our kernel after our
kernel (every boundary can overlap under PDL), and cuBLAS's GEMM between them (ours can overlap only the launch after
the GEMM).
kernels/grid_dependency.py says what PDL changes; benchmarks/NOTES_kernels.md (run 23) what was predicted.

    python benchmarks/launch_gaps.py --out benchmarks/results/launch_gaps_h200.json
"""

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.results_file import write_json  # noqa: E402
from diffrt.kernels import grid_dependency  # noqa: E402
from diffrt.kernels.layer_norm import layer_norm  # noqa: E402

CHAINS = ("layer_norm", "layer_norm after gemm")


def chain(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, proj: torch.Tensor, n: int) -> torch.Tensor:
    """n LayerNorms, each reading the previous one's output (and, after a GEMM, that GEMM's)."""
    for _ in range(n):
        if kind == "layer_norm after gemm":
            x = x @ proj
        x = layer_norm(x, w, b)
    return x


def measure(kind: str, pdl: bool, rows: int, width: int, n: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(rows, width, device="cuda", dtype=torch.float16)
    w, b = torch.ones(width, device="cuda", dtype=torch.float16), torch.zeros(width, device="cuda", dtype=torch.float16)
    proj = torch.eye(width, device="cuda", dtype=torch.float16)  # keeps the values where LayerNorm left them
    with grid_dependency.enabled(pdl):
        chain(kind, x, w, b, proj, 2)  # compile and autotune outside the capture
        ms = triton.testing.do_bench_cudagraph(lambda: chain(kind, x, w, b, proj, n), rep=200)
    return {"chain": kind, "pdl": pdl, "rows": rows, "width": width, "launches": n, "ms": ms,
            "us_per_link": ms * 1e3 / n}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/launch_gaps.json")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--launches", type=int, default=200)
    ap.add_argument("--commit", default=None, help="the commit the call runs (the device's git metadata may be stale)")
    args = ap.parse_args()
    env = environment(args.commit)
    rows = []
    for kind in CHAINS:
        for pdl in (False, True):
            rows.append({**env, **measure(kind, pdl, args.rows, args.width, args.launches)})
            r = rows[-1]
            link, total = f"{r['us_per_link']:.2f} us a link", f"{r['ms']:.3f} ms for {r['launches']}"
            print(f"{kind:<24} pdl={str(pdl):<5} {link} ({total})")
        off, on = rows[-2]["us_per_link"], rows[-1]["us_per_link"]
        print(f"  PDL saves {off - on:.2f} us a link ({(off - on) / off:.0%})", flush=True)
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
