"""Latency of one pipeline on its own GPU: each component as a CUDA-graph replay, and whole generations end to end.

What `diffrt bench` prints and what benchmarks/latency.py records beside its peers. Components are timed as graph
replays with the L2 cache flushed before each (how the fast path runs them); end to end is the wall time of
`Pipeline.generate` from prompt to image tensor on the GPU, the prompt cache emptied before each call so the text
encoder always runs, the device-to-host copy and image encoding left out.
"""

import statistics
import time
from collections.abc import Callable

import torch

from diffrt.pipeline import Pipeline
from diffrt.request import GenerationRequest

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
# name -> (sampler, steps, guidance): the runs the issue tracks.
RUNS = {"1 step": ("turbo", 1, 0.0), "LCM 4 steps": ("lcm", 4, 1.0), "25 steps CFG": ("euler", 25, 7.5)}
_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512,768x1344' -> [(512, 512), (768, 1344)]: a size is a square's side or HEIGHTxWIDTH."""
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().lower().partition("x")
        try:
            sizes.append((int(h), int(w or h)))
        except ValueError:
            raise ValueError(f"size {item!r} is neither a side (512) nor HEIGHTxWIDTH (768x1344)") from None
    return sizes


def size_label(height: int, width: int) -> str:
    return f"{height}²" if height == width else f"{height}x{width}"


def quantiles(times_ms: list[float]) -> dict:
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[1], "p80_ms": q[7], "repeats": len(times_ms)}


def graph_replay_ms(fn: Callable[[], object], rep_ms: float = 300.0, max_repeats: int = 200) -> dict:
    """Median/p20/p80 ms of replays of `fn` captured in a CUDA graph, L2 flushed before each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compilation, autotuning and first allocations outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    n = int(min(max_repeats, max(10, rep_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        flush.zero_()
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    del graph
    return quantiles([s.elapsed_time(e) for s, e in events])


def component_times(pipe: Pipeline, batch: int, height: int, width: int, cfg: bool) -> dict[str, dict]:
    """Each role alone as a graph replay at this bucket: text encoder (batch prompts), one UNet step (the CFG batch
    where `cfg`), the decode of `batch` latents."""
    spec, device, dtype = pipe.spec, pipe.device, pipe.dtype
    request = GenerationRequest([PROMPT] * batch, height=height, width=width, steps=1, sampler="euler",
                                guidance_scale=7.5 if cfg else 1.0, output_type="pt")  # fmt: skip
    plan = pipe.plan(pipe.resolve(request))
    tokenizer, tokenizer_2 = pipe.tokenizers
    ids = tokenizer([PROMPT] * batch).to(device) if tokenizer is not None else None
    ids_2 = tokenizer_2([PROMPT] * batch).to(device) if tokenizer_2 is not None else None
    encoder = getattr(pipe.roles.text_encoder, "encoder", pipe.roles.text_encoder)  # the graphed one's inner role
    x = torch.cat([plan.latents, plan.latents]) if cfg else plan.latents
    t = torch.tensor(999.0, device=device)
    latents = torch.randn((batch, spec.latent_channels, height // spec.vae_scale, width // spec.vae_scale),
                          device=device, dtype=dtype)  # fmt: skip
    with torch.inference_mode():
        return {
            "text_encoder": graph_replay_ms(lambda: encoder(ids, ids_2)),
            "unet_step": graph_replay_ms(lambda: pipe.roles.denoiser(x, t, plan.cond)),
            "decode": graph_replay_ms(lambda: pipe.roles.codec.decode(latents)),
        }


def end_to_end(pipe: Pipeline, request: GenerationRequest, repeats: int = 15) -> dict:
    """Wall time of generate() to an image tensor on the GPU (text encoder included), after two warm-up calls;
    peak GPU memory of those calls; whether the last image is finite and not one flat colour (checked after the
    timing, so the check's sync is not timed)."""
    request = GenerationRequest(**{**request.__dict__, "output_type": "pt"})
    for _ in range(2):
        pipe.prompt_cache.clear()
        pipe.generate(request)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        pipe.prompt_cache.clear()
        t0 = time.perf_counter()
        images = pipe.generate(request).images
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return {**quantiles(times), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, **image_check(images)}


def image_check(images: torch.Tensor) -> dict:
    """Whether a generated batch is finite, and its smallest per-image spread (0: a flat, e.g. black, image)."""
    flat = images.float().flatten(1)
    return {"image_finite": bool(torch.isfinite(flat).all()), "image_min_std": float(flat.std(dim=1).min())}
