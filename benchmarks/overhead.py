"""Where an end-to-end call's time goes beyond its components' graph replays (issue 10's "no host overhead left").

One pipeline on the fast path, one bucket (default SD2.1 arch, 512², 1 step). It reports, in one JSON:
- the host time of each stage of `Pipeline.generate` (resolve, tokenize, text encoder launch, conditioning, noise,
  bucket input copies, replay launch, output) over repeated calls, with no sync inside a call;
- a torch.profiler trace of a few calls: when the GPU first gets work after the call starts, the GPU's busy time and
  every idle gap inside the call, with the host ranges that ran during each gap (what the GPU waited for);
- the synchronizing CUDA calls one call makes (CUDA's sync debug mode);
- end to end under variants that each remove one piece of host work (the prompt cache kept, a caller's generator,
  the request resolved beforehand), so the share of each is a difference of medians from the same process.

    python benchmarks/overhead.py --arch sd21 --size 512 --run "1 step" --out results/overhead_h200.json
"""

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.latency import diffrt_pipeline  # noqa: E402
from benchmarks.results_file import write_json  # noqa: E402
from diffrt import latency  # noqa: E402
from diffrt.request import GenerationRequest  # noqa: E402

STAGE_PREFIX = "diffrt::"


def instrument(pipe, host_ms: dict[str, list[float]]) -> None:
    """Wrap the stages of a call in record_function ranges (for the trace) and host timers (no sync)."""
    from diffrt.backends import cuda_graph, graphs

    def wrap(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            with torch.profiler.record_function(STAGE_PREFIX + label):
                out = inner(*args, **kwargs)
            host_ms[label].append((time.perf_counter() - t0) * 1000)
            return out

        setattr(owner, name, timed)

    wrap(pipe, "generate", "generate")
    wrap(pipe, "resolve", "resolve")
    wrap(pipe, "plan", "plan")
    wrap(pipe, "encode_prompt", "encode_prompt")
    for tokenizer_type in {type(t) for t in pipe.tokenizers if t is not None}:  # called as tokenizer(prompts)
        wrap(tokenizer_type, "__call__", "tokenize")
    wrap(cuda_graph.GraphedTextEncoder, "__call__", "text encoder (graph)")
    wrap(pipe.backend, "run", "backend.run")
    wrap(cuda_graph._Bucket, "__call__", "bucket inputs+replay")
    wrap(graphs.CapturedCall, "replay", "graph replay+clone")


def wall_ms(pipe, request: GenerationRequest, repeats: int, keep_prompt: bool = False, generator=None) -> dict:
    return _timed(pipe, lambda: pipe.generate(request, generator=generator), repeats, keep_prompt)


def resolved_only_ms(pipe, request: GenerationRequest, repeats: int) -> dict:
    """The call without its resolve step: plan + run on a request resolved once beforehand."""
    resolved = pipe.resolve(request)

    @torch.inference_mode()
    def call():
        pipe.backend.run(pipe.plan(resolved), pipe.roles)

    return _timed(pipe, call, repeats)


def _timed(pipe, call, repeats: int, keep_prompt: bool = False) -> dict:
    """Wall-clock quantiles of `call()` to its last GPU work, the prompt cache emptied first unless kept."""
    times = []
    for _ in range(repeats):
        if not keep_prompt:
            pipe.prompt_cache.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return latency.quantiles(times)


def trace_gaps(pipe, request: GenerationRequest, calls: int, trace_path: str | None) -> list[dict]:
    """Profile `calls` calls; per call: wall, GPU busy, first-kernel delay, gaps > 20 µs and the host ranges in them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            pipe.prompt_cache.clear()
            pipe.generate(request)
            torch.cuda.synchronize()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    events = list(prof.events())
    gpu = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA)
    host = [e for e in events if e.device_type == DeviceType.CPU]
    calls_out = []
    for call in (e for e in host if e.name == STAGE_PREFIX + "generate"):
        c0, c1 = call.time_range.start, call.time_range.end
        kernels = [(s, e, n) for s, e, n in gpu if s < c1 + 50_000 and e > c0 and s >= c0]
        busy, gaps, cursor = 0.0, [], c0
        for s, e, n in kernels:
            if s - cursor > 20:
                during = sorted(
                    {
                        h.name
                        for h in host
                        if h.time_range.start < s
                        and h.time_range.end > cursor
                        and h.name.startswith((STAGE_PREFIX, "aten::", "cuda"))
                    }  # fmt: skip
                )
                gaps.append({"from_us": cursor - c0, "us": s - cursor, "before_kernel": n[:80], "host": during[:12]})
            busy += max(0.0, e - max(s, cursor))
            cursor = max(cursor, e)
        calls_out.append({
            "wall_us": c1 - c0,
            "gpu_end_after_call_start_us": cursor - c0,
            "gpu_busy_us": busy,
            "first_kernel_us": (kernels[0][0] - c0) if kernels else None,
            "kernels": len(kernels),
            "gaps": gaps,
        })  # fmt: skip
    return calls_out


def tokenizer_parts_us(pipe, repeats: int = 300) -> dict:
    """Host µs (median) of the tokenizer's parts for the harness's prompt: the whole call, the `tokenizers` encode
    alone, the id tensor's construction, and the pinned copy to the GPU (run 7 found the call ~7x slower on the
    device's host than on the development machine)."""
    from diffrt.plan import to_device_no_sync

    tokenizer = pipe.tokenizers[0] or pipe.tokenizers[1]
    rows = tokenizer([latency.PROMPT]).tolist()
    parts = {
        "tokenizer call": lambda: tokenizer([latency.PROMPT]),
        "tokenizers encode": lambda: tokenizer._tok.encode(latency.PROMPT, add_special_tokens=False),
        "id tensor": lambda: torch.tensor(rows, dtype=torch.int64),
        "pinned copy": lambda: to_device_no_sync(torch.tensor(rows, dtype=torch.int64), pipe.device),
    }
    out = {}
    for name, fn in parts.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        out[name] = statistics.median(times[repeats // 10 :])
    torch.cuda.synchronize()
    return out


def syncs_of_one_call(pipe, request: GenerationRequest) -> list[str]:
    pipe.prompt_cache.clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.generate(request)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message)[:300] for w in caught]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd21")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--run", default="1 step", choices=list(latency.RUNS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--tiny-vae", action="store_true", help="decode with TAESD (TAESDXL) instead of the KL VAE")
    ap.add_argument("--trace", default=None, help="also write the chrome trace here")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    pipe = diffrt_pipeline(args.arch, tiny_vae=args.tiny_vae, backend="cuda-graph")
    sampler, steps, guidance = latency.RUNS[args.run]
    request = GenerationRequest(latency.PROMPT, height=args.size, width=args.size, sampler=sampler, steps=steps,
                                guidance_scale=guidance, output_type="pt", seed=1)  # fmt: skip
    for _ in range(3):  # capture the bucket and the text encoder's graph, warm every cache
        pipe.prompt_cache.clear()
        pipe.generate(request)
    torch.cuda.synchronize()
    components = latency.component_times(pipe, 1, args.size, args.size, cfg=guidance > 1)
    component_sum = sum(c["median_ms"] for c in components.values())
    if steps > 1:
        component_sum += (steps - 1) * components["unet_step"]["median_ms"]
    variants = {
        "as the harness times it": wall_ms(pipe, request, args.repeats),
        "prompt cache kept (no text encoder)": wall_ms(pipe, request, args.repeats, keep_prompt=True),
        "caller's generator": wall_ms(pipe, request, args.repeats, generator=torch.Generator("cuda").manual_seed(1)),
        "resolved beforehand": resolved_only_ms(pipe, request, args.repeats),
    }
    tokenizer_us = tokenizer_parts_us(pipe)
    host_ms: dict[str, list[float]] = defaultdict(list)
    instrument(pipe, host_ms)
    wall_ms(pipe, request, args.repeats)
    stages = {k: statistics.median(v) for k, v in host_ms.items()}
    syncs = syncs_of_one_call(pipe, request)
    gaps = trace_gaps(pipe, request, 3, args.trace)
    out = {
        **environment(args.commit),
        "arch": args.arch,
        "size": args.size,
        "run": args.run,
        "decoder": "TAESD" if args.tiny_vae else "KL VAE",
        "components_ms": {k: v["median_ms"] for k, v in components.items()},
        "component_sum_ms": component_sum,
        "end_to_end_ms": {k: v["median_ms"] for k, v in variants.items()},
        "host_stage_ms": stages,
        "tokenizer_parts_us": tokenizer_us,
        "sync_warnings": syncs,
        "profiled_calls": gaps,
    }
    write_json(args.out, out)
    shown = ("components_ms", "component_sum_ms", "end_to_end_ms", "host_stage_ms", "tokenizer_parts_us")
    print(json.dumps({k: out[k] for k in shown}, indent=1))
    print(f"{len(syncs)} synchronizing calls:", *syncs[:5], sep="\n  ")
    for call in gaps:
        print({k: v for k, v in call.items() if k != "gaps"})
        for g in call["gaps"][:8]:
            print("   gap", round(g["us"]), "us at", round(g["from_us"]), "us before", g["before_kernel"], g["host"])


if __name__ == "__main__":
    main()
