"""Where a component's GPU time goes, kernel by kernel (issue 11): the fast path's kernels (Triton, channels-last on a
GPU) run eagerly under torch.profiler, since a kernel takes the same GPU time inside a CUDA graph and the profiler
names it outside one. Per component (text encoder, one UNet step, VAE decode; the inputs of a real plan):

- ops: the aten ops the profiler counts FLOPs for (convolutions, matmuls), ms per call, TFLOP/s, and their share;
- kernels: the top kernels by GPU time per call, with their count, so the rest (norms, attention, elementwise) shows;
- the component's kernel time per call against its floors: its counted FLOPs at the H200's ~790 dense fp16 TFLOP/s
  (../shared/BENCHMARKING.md; attention's FLOPs are not counted by the profiler, so it is a lower bound) and its
  weights read once at 4.8 TB/s (what bounds the text encoder, 77 tokens against hundreds of MB of weights).

    python benchmarks/profile_components.py --preset sd21 --size 512 --json benchmarks/results/profile_sd21_512.json
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.results_file import write_json  # noqa: E402
from diffrt.backends.eager import EagerBackend  # noqa: E402
from diffrt.models.ops import TRITON_OPS  # noqa: E402
from diffrt.pipeline import Pipeline  # noqa: E402
from diffrt.request import GenerationRequest  # noqa: E402

PEAK_TFLOPS = 790.0  # H200 dense fp16 tensor-core peak, as the FLOP floors of ../shared/BENCHMARKING.md use
HBM_TBPS = 4.8  # H200 memory bandwidth: reading a component's weights once takes at least their bytes / this
PROMPT = "a photo of a cat, highly detailed"
RANGE = "component"  # the profiler range around each call


def component_calls(pipe: Pipeline, size: int, batch: int, guidance: float) -> dict:
    """name -> (a no-argument call of that component on a real plan's inputs (one UNet step at the first timestep),
    the bytes of the weights it reads)."""
    request = GenerationRequest(PROMPT, height=size, width=size, steps=1, batch=batch, seed=0, guidance_scale=guidance)
    request = pipe.resolve(request)
    plan = pipe.plan(request)
    tokenizer, tokenizer_2 = pipe.tokenizers
    ids = tokenizer([PROMPT] * batch).to(pipe.device)
    ids_2 = tokenizer_2([PROMPT] * batch).to(pipe.device) if tokenizer_2 is not None else None
    roles = pipe.roles
    latents = plan.latents
    x = torch.cat([latents, latents]) if plan.guidance_scale is not None else latents
    t = torch.full((x.shape[0],), float(plan.schedule.timesteps[0]), device=pipe.device)
    c = pipe.components
    encoders = [m for m in (c.text_encoder, c.text_encoder_2) if m is not None]
    return {
        "text_encoder": (lambda: roles.text_encoder(ids, ids_2, request.clip_skip), _bytes(*encoders)),
        "unet_step": (lambda: roles.denoiser(x.to(pipe.dtype), t, plan.cond), _bytes(c.unet)),
        "vae_decode": (lambda: roles.codec.decode(latents), _bytes(c.vae.decoder, c.vae.post_quant_conv)),
    }


def _bytes(*modules) -> int:
    return sum(p.nbytes for m in modules if m is not None for p in m.parameters())


def _device_us(event, self_only: bool) -> float:
    """An averaged profiler event's GPU time in µs (its own kernels, or with its children's)."""
    return float(getattr(event, "self_device_time_total" if self_only else "device_time_total", 0.0))


def profile_call(fn, weight_bytes: int, calls: int, top: int) -> dict:
    """Profile `calls` calls of fn after warm-up; the table of one component, per call."""
    gpu = torch.cuda.is_available()
    for _ in range(3):
        fn()
    if gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch.inference_mode(), profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        for _ in range(calls):
            with record_function(RANGE):
                fn()
        if gpu:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    # The record_function range shows up among the CUDA events too (its GPU span): it is not a kernel.
    kernels = [e for e in averages if gpu and e.device_type == torch.autograd.DeviceType.CUDA and e.key != RANGE]
    kernel_ms = sum(_device_us(e, True) for e in kernels) / 1e3 / calls
    ops = []
    for e in averages:
        if e.flops and e.key.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU:
            ms = _device_us(e, False) / 1e3 / calls
            ops.append({"op": e.key, "calls": e.count // calls, "ms": ms, "gflop": e.flops / calls / 1e9,
                        "tflops": e.flops / calls / (ms * 1e9) if ms else None})  # fmt: skip
    ops.sort(key=lambda r: -r["gflop"])
    top_kernels = sorted(kernels, key=lambda e: -_device_us(e, True))[:top]
    gflop = sum(r["gflop"] for r in ops if r["op"] in COUNTED)
    return {
        "kernel_ms": kernel_ms,
        "kernel_launches": sum(e.count for e in kernels) // calls,
        "counted_gflop": gflop,
        "flop_floor_ms": gflop / PEAK_TFLOPS,
        "weights_mb": weight_bytes / 1e6,
        "weight_read_floor_ms": weight_bytes / (HBM_TBPS * 1e9),
        "ops": ops,
        "kernels": [
            {
                "name": e.key[:120],
                "calls": e.count // calls,
                "ms": _device_us(e, True) / 1e3 / calls,
                "share": _device_us(e, True) / 1e3 / calls / kernel_ms if kernel_ms else None,
            }
            for e in top_kernels
        ],  # fmt: skip
    }


# The ops torch.profiler counts FLOPs for that are summed (elementwise ops' FLOPs are negligible and not tensor-core
# work; aten::linear and aten::matmul carry none themselves, their addmm / mm do).
COUNTED = ("aten::conv2d", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def print_table(name: str, r: dict) -> None:
    print(f"\n{name}: {r['kernel_ms']:.3f} ms of kernels per call, {r['kernel_launches']} launches, "
          f"{r['counted_gflop']:.1f} GFLOP counted -> floor {r['flop_floor_ms']:.3f} ms; "
          f"{r['weights_mb']:.0f} MB of weights -> floor {r['weight_read_floor_ms']:.3f} ms")  # fmt: skip
    for op in r["ops"]:
        if op["op"] in COUNTED:
            tf = f"{op['tflops']:.0f} TFLOP/s" if op["tflops"] else "-"
            print(f"  {op['op']:22s} x{op['calls']:<4d} {op['ms']:8.3f} ms {op['gflop']:8.1f} GFLOP  {tf}")
    for k in r["kernels"]:
        share = f"{100 * k['share']:5.1f}%" if k["share"] is not None else "   - "
        print(f"  {share} {k['ms']:8.3f} ms x{k['calls']:<4d} {k['name']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd21")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0, help="> 1: the UNet step runs the CFG batch (2x)")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--components", default="text_encoder,unet_step,vae_decode")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    backend = EagerBackend("triton", TRITON_OPS) if gpu else "torch"
    pipe = Pipeline.from_pretrained(args.preset, device=device, dtype=dtype, backend=backend)
    if gpu:  # the fast path's layout (CudaGraphBackend.roles)
        for module in (pipe.components.unet, pipe.components.vae):
            module.to(memory_format=torch.channels_last)
    calls = component_calls(pipe, args.size, args.batch, args.guidance)
    implementation = "triton, channels-last" if gpu else "torch (CPU: no GPU times)"
    setup = {"preset": args.preset, "size": args.size, "batch": args.batch, "guidance": args.guidance,
             "dtype": str(dtype), "implementation": implementation}  # fmt: skip
    # "implementation", not "kernels": each component's row also holds its top "kernels", which once overwrote this
    report = {"environment": {**environment(args.commit), **setup}}
    for name in args.components.split(","):
        fn, weight_bytes = calls[name]
        report[name] = {**report["environment"], **profile_call(fn, weight_bytes, args.calls, args.top)}
        print_table(name, report[name])
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
