"""Real-time stream: frames per second and per-frame latency (p50/p99) of diffrt.Stream, beside StreamDiffusion
0.1.1 and diffrt's own naive per-frame pipeline call, in one device call.

SD2.1 architecture (SD-Turbo's: epsilon) 1 step and SD1.5 architecture LCM 4 steps (StreamDiffusion's examples:
t_index_list [32] / [0] and [0, 16, 32, 45] of 50), 512², fp16, random weights; img2img and txt2img; TAESD and
the full VAE; the ablation of stream batch and of residual CFG (none / self / initialize / full). Every frame goes
in as uint8 [512, 512, 3] on the host (random, rotating) and comes out the same way, the device-to-host copy
included; JPEG decode and encode (what the server adds) are timed apart. Per row: fps over the measured frames,
call latency p50/p99 (wall time of one call), frame latency (submission to picture: with stream batch it spans
len(steps) - 1 later calls), and for diffrt the frame graph's replay time alone (GPU work per frame). Rows go to
--out as they are measured (benchmarks.latency.Results: a cut-off call keeps them, the next one resumes);
--budget-s stops starting rows; `--report` writes the markdown table and checks the issue's targets.

    python benchmarks/stream.py --archs sd21,sd15 --out results/stream_h200.json --budget-s 300 --commit SHA
    python benchmarks/stream.py --report results/stream_h200.json
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.latency import Results, diffrt_pipeline  # noqa: E402
from diffrt.latency import PROMPT  # noqa: E402
from diffrt.stream import Stream  # noqa: E402

SIZE, FRAMES, WARMUP, DISTINCT = 512, 200, 20, 8
STEPS = {"sd21": {"img2img": (32,), "txt2img": (0,)}, "sd15": {"img2img": (0, 16, 32, 45), "txt2img": (0, 16, 32, 45)}}
# diffrt's frames per graph run beyond 1 (StreamDiffusion's frame_buffer_size), measured beside the headline rows.
FRAMES_PER_CALL = {"sd21": (2, 3, 4), "sd15": (2,)}
SIMILARITY = 0.98  # StreamDiffusion's default threshold
TARGETS = [  # (arch, what, fps at least, p99 ms at most): the issue's, on the H200
    ("sd21", "img2img taesd stream-batch none", 200, 15.0),
    ("sd21", "txt2img taesd stream-batch none", 250, None),
    ("sd15", "img2img taesd stream-batch none", 80, None),
    ("sd15", "txt2img taesd stream-batch none", 80, None),
]


class Cell(NamedTuple):
    """One row of the table: who runs which stream."""

    arch: str
    impl: str  # "diffrt stream", "streamdiffusion" or "diffrt pipeline" (the naive call)
    mode: str
    codec: str
    stream_batch: bool = True
    guidance: str = "none"
    frames_per_call: int = 1
    similarity: float | None = None  # the similarity filter's threshold, on a video whose frames each come twice

    @property
    def what(self) -> str:
        return what(self.mode, self.codec, self.stream_batch, self.guidance, self.frames_per_call, self.similarity)


def plan(archs: list[str]) -> list[Cell]:
    """The cells, most important first across the architectures (a call cut short by its time box loses ablation
    rows, not headline ones): the headline rows beside StreamDiffusion and diffrt's with several frames per graph
    run, then the full VAE and the naive baseline, then the ablations of stream batch, residual CFG and the
    similarity filter."""
    tiers: list[list[Cell]] = [[], [], []]
    both = ("diffrt stream", "streamdiffusion")
    for arch in archs:
        n = len(STEPS[arch]["img2img"])
        for mode in ("img2img", "txt2img"):
            tiers[0] += [Cell(arch, impl, mode, "taesd") for impl in both]
            tiers[0] += [Cell(arch, "diffrt stream", mode, "taesd", frames_per_call=f) for f in FRAMES_PER_CALL[arch]]
            tiers[1] += [Cell(arch, impl, mode, "vae") for impl in both]
            tiers[1] += [Cell(arch, "diffrt pipeline", mode, codec, stream_batch=False) for codec in ("taesd", "vae")]
            if n > 1:
                tiers[2] += [Cell(arch, impl, mode, "taesd", stream_batch=False) for impl in both]
            for guidance in ("self", "initialize", "full"):
                tiers[2] += [Cell(arch, impl, mode, "taesd", guidance=guidance) for impl in both]
            if mode == "img2img":
                tiers[2] += [Cell(arch, impl, mode, "taesd", similarity=SIMILARITY) for impl in both]
    return [cell for tier in tiers for cell in tier]


def what(mode: str, codec: str, stream_batch: bool, guidance: str, frames_per_call: int = 1,
         similarity: float | None = None) -> str:  # fmt: skip
    group = f" x{frames_per_call} frames/call" if frames_per_call > 1 else ""
    filtered = f" similarity-filter {similarity:g} (each frame twice)" if similarity is not None else ""
    return f"{mode} {codec} {'stream-batch' if stream_batch else 'per-frame'} {guidance}{group}{filtered}"


def host_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def measure(call, inputs: list[np.ndarray], frames: int = FRAMES, warmup: int = WARMUP) -> dict:
    """`call(frame)` per frame after warm-up; returns fps over the window and call-latency quantiles. A call may
    return diffrt's reports, whose frame latencies are collected too."""
    for i in range(warmup):
        call(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    calls, latencies = [], []
    start = time.perf_counter()
    for i in range(frames):
        t0 = time.perf_counter()
        reports = call(inputs[i % len(inputs)])
        calls.append((time.perf_counter() - t0) * 1000)
        if isinstance(reports, list):
            latencies += [r.latency_ms for r in reports if r.latency_ms is not None]
    seconds = time.perf_counter() - start
    return {"fps": frames / seconds, "median_ms": float(np.median(calls)), "p20_ms": percentile(calls, 20),
            "p80_ms": percentile(calls, 80), "p99_ms": percentile(calls, 99), "max_ms": max(calls),
            "frame_latency_p50_ms": percentile(latencies, 50), "frame_latency_p99_ms": percentile(latencies, 99),
            "frames": frames}  # fmt: skip


def graph_replay_ms(stream: Stream, repeats: int = 100) -> float:
    """The frame graph's replay alone, back to back (CUDA events): the GPU work of one frame."""
    graph = stream._call.graph
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def diffrt_stream_row(pipe, c: Cell, inputs) -> dict:
    steps = STEPS[c.arch][c.mode]
    t0 = time.perf_counter()
    stream = Stream(pipe, prompt=PROMPT, height=SIZE, width=SIZE, steps=steps, num_inference_steps=50, mode=c.mode,
                    guidance=c.guidance, guidance_scale=None if c.guidance == "none" else 1.2,
                    stream_batch=c.stream_batch, frames_per_call=c.frames_per_call,
                    similarity_threshold=c.similarity)  # fmt: skip
    prepare_s = time.perf_counter() - t0
    call = stream if c.mode == "img2img" else (lambda _: stream.txt2img())
    row = measure(call, inputs)
    unet_batch = {"none": 1, "self": 1, "initialize": 1, "full": 2}[c.guidance] * (len(steps) if c.stream_batch else 1)
    unet_batch = (unet_batch + (1 if c.guidance == "initialize" else 0)) * c.frames_per_call
    # graph_ms is one run's GPU time, for frames_per_call frames
    return {**row, "graph_ms": graph_replay_ms(stream), "prepare_s": prepare_s, "steps": list(steps),
            "delay_frames": stream.config.delay * c.frames_per_call, "unet_batch": unet_batch,
            "frames_per_call": c.frames_per_call}  # fmt: skip


def diffrt_pipeline_row(pipe, arch: str, mode: str, inputs) -> dict:
    """The naive per-frame call: pipe(...) with the same number of UNet steps (img2img: 2n steps at strength 0.5
    run the last n), host frame in, host array out."""
    n = len(STEPS[arch][mode])

    def call(frame: np.ndarray):
        if mode == "img2img":
            image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
            return pipe(PROMPT, image=image, strength=0.5, steps=2 * n, sampler="lcm", guidance_scale=1.0,
                        output_type="np")  # fmt: skip
        return pipe(PROMPT, steps=n, sampler="lcm", guidance_scale=1.0, output_type="np", seed=0)

    return {**measure(call, inputs, frames=60, warmup=5), "steps": n}


def peer_row(diffusers_pipe, taesd, c: Cell, inputs) -> dict:
    from benchmarks.stream_peer import StreamDiffusionPeer

    steps = STEPS[c.arch][c.mode]
    peer = StreamDiffusionPeer(diffusers_pipe, taesd, steps, c.mode, c.guidance, c.stream_batch, SIZE, PROMPT,
                               similarity=c.similarity)  # fmt: skip
    return {**measure(peer, inputs, frames=100), "steps": list(steps)}


def jpeg_rows(res: Results) -> None:
    """What the server adds per frame on the host: decode the client's JPEG, encode the picture (PIL, quality 85)."""
    from diffrt.stream.session import decode_frame, encode_jpeg

    y, x = np.mgrid[0:SIZE, 0:SIZE]
    picture = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)  # smooth, like a camera frame
    data = encode_jpeg(picture, 85)
    for name, fn in [("jpeg decode", lambda: np.asarray(decode_frame(data))), ("jpeg encode",
                     lambda: encode_jpeg(picture, 85))]:  # fmt: skip
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        res.add(arch="host", impl="PIL", what=name, batch=1, height=SIZE, width=SIZE, median_ms=float(np.median(times)),
                p99_ms=percentile(times, 99), bytes=len(data))  # fmt: skip


class Models:
    """Each architecture's pipelines (full VAE, TAESD; from the preset's seed, so the same UNet and text encoder
    weights) and the diffusers copy StreamDiffusion runs on, built on first use and kept for the whole call."""

    def __init__(self) -> None:
        self._pipes: dict[tuple[str, str], object] = {}
        self._diffusers: dict[str, object] = {}

    def pipe(self, arch: str, codec: str):
        if (arch, codec) not in self._pipes:
            self._pipes[arch, codec] = diffrt_pipeline(arch, codec == "taesd", "cuda-graph", prediction_type="epsilon")
        return self._pipes[arch, codec]

    def diffusers(self, arch: str):
        from benchmarks import peers

        if arch not in self._diffusers:
            self._diffusers[arch] = peers.diffusers_pipeline(self.pipe(arch, "vae"), arch)
        return self._diffusers[arch]


def run(res: Results, archs: list[str], deadline: float, peers_on: bool) -> None:
    inputs, models = host_frames(DISTINCT), Models()
    twice = [frame for frame in inputs for _ in range(2)]  # a video at half the camera's rate: every frame repeated
    for c in plan(archs):
        cell = {"arch": c.arch, "impl": c.impl, "batch": 1, "height": SIZE, "width": SIZE}
        if res.has(**cell, what=c.what) or (c.impl == "streamdiffusion" and not peers_on):
            continue
        if time.time() > deadline:
            print(f"budget spent: {c.arch} {c.impl} {c.what} and later rows not measured", flush=True)
            return
        frames = inputs if c.similarity is None else twice
        try:
            if c.impl == "diffrt stream":
                row = diffrt_stream_row(models.pipe(c.arch, c.codec), c, frames)
            elif c.impl == "diffrt pipeline":
                row = diffrt_pipeline_row(models.pipe(c.arch, c.codec), c.arch, c.mode, frames)
            else:
                taesd = models.pipe(c.arch, "taesd").components.vae if c.codec == "taesd" else None
                row = peer_row(models.diffusers(c.arch), taesd, c, frames)
            res.add(**cell, what=c.what, mode=c.mode, codec=c.codec, stream_batch=c.stream_batch,
                    guidance=c.guidance, similarity_threshold=c.similarity, **row)  # fmt: skip
        except Exception as e:  # a row that fails is recorded with its error; the others still run
            res.add(**cell, what=c.what, median_ms=None, error=f"{type(e).__name__}: {e}"[:500])
        torch.cuda.empty_cache()


def report(path: str) -> None:
    rows = json.loads(Path(path).read_text())["rows"]
    by = {(r["arch"], r["impl"], r["what"]): r for r in rows}
    # A call's latency and a frame's differ: with several frames per call most calls only queue their frame, and with
    # stream batch a frame's picture comes back steps (x frames per call) calls later.
    lines = ["| arch | what | diffrt stream fps (call p50 / p99 ms; graph ms; frame latency p99 ms) | "
             "StreamDiffusion fps (call p50 / p99 ms) | ratio | naive diffrt pipeline fps |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for arch, _, name in sorted({(r["arch"], 0, r["what"]) for r in rows if r["impl"] == "diffrt stream"}):
        ours, peer = by.get((arch, "diffrt stream", name)), by.get((arch, "streamdiffusion", name))
        mode, codec = name.split()[:2]
        # the naive call runs without guidance: beside the guidance-free rows only
        naive = by.get((arch, "diffrt pipeline", what(mode, codec, False, "none"))) if name.endswith(" none") else None

        def cell(r: dict | None, graph: bool = False) -> str:
            if not r or r.get("fps") is None:
                return r.get("error", "")[:40] if r else ""
            extra = f"; {r['graph_ms']:.2f}" if graph and r.get("graph_ms") else ""
            if graph and r.get("frame_latency_p99_ms") is not None:
                extra += f"; {r['frame_latency_p99_ms']:.2f}"
            return f"{r['fps']:.0f} ({r['median_ms']:.2f} / {r['p99_ms']:.2f}{extra})"

        ratio = f"{ours['fps'] / peer['fps']:.2f}x" if ours and peer and ours.get("fps") and peer.get("fps") else ""
        naive_fps = f"{naive['fps']:.0f}" if naive and naive.get("fps") else ""
        lines.append(f"| {arch} | {name} | {cell(ours, True)} | {cell(peer)} | {ratio} | {naive_fps} |")
    for r in rows:
        if r["arch"] == "host":
            lines.append(f"\n{r['what']} {r['height']}²: {r['median_ms']:.2f} ms (p99 {r['p99_ms']:.2f})")
    lines.append("\nTargets (H200; p99 is the frame latency, submission to picture, a group's wait included):")
    for arch, name, fps, p99 in TARGETS:
        candidates = [r for (a, impl, n), r in by.items() if a == arch and impl == "diffrt stream"
                      and (n == name or n.startswith(name + " x")) and r.get("fps") is not None]  # fmt: skip
        if not candidates:
            lines.append(f"- {arch} {name}: not measured")
            continue
        bar = f">= {fps} fps" + (f", p99 <= {p99} ms" if p99 else "")
        for r in sorted(candidates, key=lambda r: r.get("frames_per_call", 1)):
            latency = r.get("frame_latency_p99_ms") or r["p99_ms"]
            met = r["fps"] >= fps and (p99 is None or latency <= p99)
            lines.append(f"- {arch} {name}, {r.get('frames_per_call', 1)} frame(s) per call: {r['fps']:.0f} fps, "
                         f"p99 {latency:.2f} ms ({bar}): {'met' if met else 'MISSED'}")  # fmt: skip
    env = rows[0] if rows else {}
    commits = ", ".join(dict.fromkeys(str(r.get("commit")) for r in rows))  # a resumed file holds several calls
    dates = sorted(str(r.get("date")) for r in rows) or ["?"]
    head = f"{env.get('gpu')}, torch {env.get('torch')}, commits {commits}, {dates[0]} to {dates[-1]}\n\n"
    Path(path).with_suffix(".md").write_text(head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="sd21,sd15")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting rows after this many seconds")
    ap.add_argument("--no-peers", action="store_true", help="skip StreamDiffusion (not installed)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--report", default=None, help="write the table of this JSON and exit")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    deadline = time.time() + args.budget_s
    res = Results(args.out, environment(args.commit))
    if not res.has(arch="host", impl="PIL", what="jpeg decode", batch=1, height=SIZE, width=SIZE):
        jpeg_rows(res)
    run(res, args.archs.split(","), deadline, not args.no_peers)
    report(args.out)


if __name__ == "__main__":
    main()
