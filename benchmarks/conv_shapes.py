"""Where a component's convolution time goes, shape by shape, and what another way of running each shape would cost.

The profile (benchmarks/profile_components.py) gives the convolutions' total: SD2.1's VAE decoder at 1024² spends
most of its time in them at ~495 TFLOP/s, against ~680 at 512². This records every convolution one call of a
component makes on the fast path (the shapes, strides and padding it passes to conv2d, counted per unique shape), then
times each shape alone as a CUDA-graph replay, L2 flushed, under:

  cudnn            channels-last, cudnn.benchmark off: what the fast path runs
  cudnn benchmark  channels-last, cuDNN's algorithm chosen by timing each (cudnn.benchmark on)
  NCHW             contiguous tensors, cudnn.benchmark off
  GEMM             1x1 convolutions only: the channels-last input as a [pixels, C] matrix times the weight (cuBLAS)
  padded out       output channels not a multiple of 8 only (the decoder's last convolution, 3 channels): the weight
                   padded with zero filters to a multiple of 8 (at least 16), the output sliced back

and sums count x time per variant, so the gain of switching a shape shows before any code changes.

    python benchmarks/conv_shapes.py --preset sd21 --components vae_decode,unet_step --sizes 512,1024 --out x.json
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.profile_components import component_calls  # noqa: E402
from benchmarks.results_file import write_json  # noqa: E402
from diffrt.backends.eager import EagerBackend  # noqa: E402
from diffrt.latency import graph_replay_ms  # noqa: E402
from diffrt.models.ops import TRITON_OPS  # noqa: E402
from diffrt.pipeline import Pipeline  # noqa: E402

# (input shape, weight shape, stride, padding, dilation, groups, dtype): what fixes a convolution's kernel choice
Shape = tuple


class _RecordConvolutions(TorchFunctionMode):
    """Counts every conv2d call by its shape while a component runs."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            x, w = args[0], args[1]
            rest = list(args[3:]) + [None] * 4
            stride, padding, dilation, groups = (kwargs.get(k, v) for k, v in zip(
                ("stride", "padding", "dilation", "groups"), rest[:4], strict=True))  # fmt: skip
            self.shapes[(tuple(x.shape), tuple(w.shape), _pair(stride or 1), _pair(padding or 0),
                         _pair(dilation or 1), groups or 1, str(x.dtype))] += 1  # fmt: skip
        return func(*args, **kwargs)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def record(fn) -> Counter:
    mode = _RecordConvolutions()
    with torch.inference_mode(), mode:
        fn()
    return mode.shapes


def gflop(shape: Shape) -> float:
    x, w, stride, padding, dilation, groups, _ = shape
    h_out = (x[2] + 2 * padding[0] - dilation[0] * (w[2] - 1) - 1) // stride[0] + 1
    w_out = (x[3] + 2 * padding[1] - dilation[1] * (w[3] - 1) - 1) // stride[1] + 1
    return 2 * x[0] * h_out * w_out * w[0] * w[1] * w[2] * w[3] / 1e9


def variants(shape: Shape) -> dict:
    """name -> (no-argument call, cudnn.benchmark) for the ways this shape can run."""
    x_shape, w_shape, stride, padding, dilation, groups, dtype = shape
    dtype = getattr(torch, dtype.removeprefix("torch."))
    x = torch.randn(x_shape, device="cuda", dtype=dtype)
    w = torch.randn(w_shape, device="cuda", dtype=dtype) * 0.05
    x_cl, w_cl = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    out = {
        "cudnn": (lambda: F.conv2d(x_cl, w_cl, None, stride, padding, dilation, groups), False),
        "cudnn benchmark": (lambda: F.conv2d(x_cl, w_cl, None, stride, padding, dilation, groups), True),
        "NCHW": (lambda: F.conv2d(x, w, None, stride, padding, dilation, groups), False),
    }
    if w_shape[2:] == (1, 1) and stride == (1, 1) and groups == 1 and padding == (0, 0):
        pixels = x_cl.permute(0, 2, 3, 1).reshape(-1, x_shape[1])  # a view: channels-last is [N, H, W, C] in memory
        matrix = w.reshape(w_shape[0], w_shape[1]).t()
        out["GEMM"] = (lambda: torch.mm(pixels, matrix), False)
    if w_shape[0] % 8:
        n = w_shape[0]
        padded = torch.zeros((max(16, -(-n // 8) * 8), *w_shape[1:]), device="cuda", dtype=dtype)
        padded = padded.to(memory_format=torch.channels_last)
        padded[:n] = w_cl
        out["padded out"] = (lambda: F.conv2d(x_cl, padded, None, stride, padding, dilation, groups)[:, :n], False)
    return out


def time_shapes(shapes: Counter) -> list[dict]:
    rows = []
    for shape, count in sorted(shapes.items(), key=lambda kv: -gflop(kv[0]) * kv[1]):
        row = {"input": shape[0], "weight": shape[1], "stride": shape[2], "padding": shape[3], "dtype": shape[6],
               "count": count, "gflop": gflop(shape), "ms": {}, "tflops": {}}  # fmt: skip
        for name, (fn, benchmark) in variants(shape).items():
            torch.backends.cudnn.benchmark = benchmark
            try:
                ms = graph_replay_ms(fn, rep_ms=60.0, max_repeats=50)["median_ms"]
            except RuntimeError as e:  # a variant cuDNN refuses (or memory): recorded, the others still run
                row.setdefault("errors", {})[name] = str(e).splitlines()[0][:200]
                continue
            finally:
                torch.backends.cudnn.benchmark = False
            row["ms"][name] = ms
            row["tflops"][name] = row["gflop"] / ms if ms else None
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> dict:
    """Per variant: the component's convolution time had every shape run that way (where it can), and the time
    with each shape on its fastest variant."""
    names = sorted({n for r in rows for n in r["ms"]})
    totals = {n: sum(r["count"] * r["ms"].get(n, r["ms"].get("cudnn", 0.0)) for r in rows) for n in names}
    totals["best per shape"] = sum(r["count"] * min(r["ms"].values()) for r in rows if r["ms"])
    return totals


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd21")
    ap.add_argument("--components", default="vae_decode,unet_step")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.preset, device="cuda", dtype=torch.float16,
                                    backend=EagerBackend("triton", TRITON_OPS))  # fmt: skip
    for module in (pipe.components.unet, pipe.components.vae):  # the fast path's layout (CudaGraphBackend.roles)
        module.to(memory_format=torch.channels_last)
    report = {"environment": environment(args.commit), "preset": args.preset, "results": []}
    for size in (int(s) for s in args.sizes.split(",")):
        calls = component_calls(pipe, size, batch=1, guidance=0.0)
        for component in args.components.split(","):
            fn, _ = calls[component]
            rows = [{**report["environment"], **row} for row in time_shapes(record(fn))]  # every row says where
            totals = summary(rows)
            report["results"].append(
                {**report["environment"], "component": component, "size": size, "shapes": rows, "totals_ms": totals}
            )  # the totals say where, as each shape does
            print(f"\n{args.preset} {component} {size}²: convolution ms per call by variant: "
                  + ", ".join(f"{n} {t:.3f}" for n, t in totals.items()))  # fmt: skip
            for r in rows:
                cells = "  ".join(f"{n} {ms:.3f} ({r['tflops'][n]:.0f})" for n, ms in r["ms"].items())
                print(f"  x{r['count']:<3d} {r['input']} * {r['weight']} s{r['stride'][0]} {r['gflop']:7.1f} GFLOP  "
                      f"{cells}")  # fmt: skip
            if args.out:  # after each component: a time-boxed call keeps what it finished
                write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
