"""On the device: LoRA switching under a captured CUDA graph, and ControlNet's per-step cost; SD1.5 architecture,
random weights, 512x512, fp16 (what they measure does not depend on the values).

- lora: one UNet step captured in a CUDA graph; LoRA A (rank 64 on every attention, feed-forward, projection and
  resnet conv) fused, then switched to B, with no recapture: after each change the replay must change and equal an
  eager call on the new weights (the switch takes effect on the next image). Rows: replay ms without a LoRA / with
  A / with B (fused LoRAs cost nothing per step), and the switch's wall time (unfuse A + fuse B, synchronized)
  against four replayed steps (a 4-step generation's UNet time, a lower bound of one generation).
- pipeline: the same on a whole fast-path generation (cuda-graph backend, LCM 4 steps): captured once without a LoRA,
  then A loaded from its file, B loaded at scale 0, switched to B (`set_lora_scales({"a": 0, "b": 1})`), back to A,
  unloaded; each next image must change, equal bit for bit a pipeline whose graphs were first captured with that LoRA
  already in, stay within fp16 tolerance of the torch backend with it, and no new graph may be captured; each change's
  wall time against one generation's.
- controlnet: one denoiser step under CFG (batch 2: UNet + ControlNet): diffrt eager, diffrt replayed from a CUDA
  graph, diffusers eager, diffusers with torch.compile (both models, default mode), all in this call on the same
  weights; each also without the ControlNet, so the rows show what it adds.
- controlnet_pipeline: whole generations, prompt to image tensor on the GPU (Euler, CFG 7.5, 4 and 8 steps; a step's
  cost is their difference over 4): diffrt's fast path (cuda-graph backend) with and without the ControlNet, against
  diffusers' StableDiffusionControlNetPipeline with torch.compile(mode="reduce-overhead") on the UNet, the ControlNet
  and the VAE decode (and its StableDiffusionPipeline, compiled the same way, without), on the same weights.

    python benchmarks/adapters.py --json adapters.json
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.accuracy import max_rel_error
from benchmarks.environment import environment
from benchmarks.results_file import write_json
from diffrt.loading.lora import adaptable_modules, read_lora
from diffrt.lora import LoRAWeights, match_lora
from diffrt.models.controlnet import controlnet_from_unet
from diffrt.models.unet import UNet2DConditionModel, UNetConfig

PROMPT = "a photo of a cat, highly detailed"
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
)


def random_kohya_lora(unet: torch.nn.Module, rank: int, seed: int, path: str) -> str:
    """A kohya-layout LoRA on the targets (diffusers module names with _), small random values."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in adaptable_modules(unet).items():
        if not name.endswith(LORA_TARGETS):
            continue
        w, stem = m.weight, "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn((rank, *w.shape[1:]), generator=g) * 0.01
        up = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        tensors[f"{stem}.lora_up.weight"] = torch.randn(up, generator=g) * 0.01
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, path)
    return path


def capture(fn):
    """(graph, its output) of fn captured after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_ms(fn, reps: int = 50) -> dict:
    """median, p20, p80 ms of fn (CUDA events around each call, after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])
    med, p20, p80 = torch.quantile(times, torch.tensor([0.5, 0.2, 0.8])).tolist()
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": reps}


def lora_rows(unet, x, t, ctx, rank: int, folder: str) -> dict:
    paths = [random_kohya_lora(unet, rank, seed, os.path.join(folder, f"lora_{n}.safetensors"))
             for seed, n in ((1, "a"), (2, "b"))]  # fmt: skip
    files = [match_lora(read_lora(p), {"unet": unet}) for p in paths]
    weights = LoRAWeights({"unet": unet})
    graph, out = capture(lambda: unet(x, t, ctx))
    rows = {"rank": rank, "layers": len(files[0])}
    graph.replay()
    before = out.clone()
    rows["no_lora"] = time_ms(graph.replay)
    for name, layers, path in (("a", files[0], paths[0]), ("b", files[1], paths[1])):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if weights.loaded:
            weights.remove()
        weights.add(name, path, layers, 1.0)
        torch.cuda.synchronize()
        switch_ms = (time.perf_counter() - t0) * 1e3
        graph.replay()
        replayed = out.clone()
        eager = unet(x, t, ctx)
        rows[f"lora_{name}"] = {
            **time_ms(graph.replay),
            "fuse_or_switch_wall_ms": switch_ms,
            "replay_changed": max_rel_error(replayed, before),
            "replay_vs_eager_max_rel_error": max_rel_error(replayed, eager),
        }
        before = replayed
    weights.remove()
    graph.replay()
    rows["unfused_replay_vs_original"] = max_rel_error(out, unet(x, t, ctx))
    rows["four_steps_ms"] = 4 * rows["no_lora"]["median_ms"]
    rows["switch_below_four_steps"] = rows["lora_b"]["fuse_or_switch_wall_ms"] < rows["four_steps_ms"]
    return rows


def pipeline_rows(rank: int, size: int, folder: str) -> dict:
    from diffrt.pipeline import Pipeline

    def pipeline(backend: str, lora: str | None = None) -> Pipeline:  # the same random weights (preset, seed 0)
        pipe = Pipeline.from_pretrained("sd15", device="cuda", dtype=torch.float16, backend=backend)
        if lora:
            pipe.load_lora(lora)
        return pipe

    pipe = pipeline("cuda-graph")
    paths = {n: random_kohya_lora(pipe.components.unet, rank, seed, os.path.join(folder, f"pipe_{n}.safetensors"))
             for seed, n in ((1, "a"), (2, "b"))}  # fmt: skip
    kw = {"height": size, "width": size, "steps": 4, "sampler": "lcm", "guidance_scale": 1.0, "seed": 0,
          "output_type": "pt"}  # fmt: skip

    def image() -> torch.Tensor:
        return pipe(PROMPT, **kw).clone()

    base = image()
    rows = {"sampler": "lcm", "steps": 4, "size": size, "rank": rank, "generation": time_ms(image, reps=20)}
    buckets = len(pipe.backend.buckets())

    def timed(change) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        change()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def checked(name: str, wall_ms: float, before: torch.Tensor) -> torch.Tensor:
        now = image()
        fresh, eager = pipeline("cuda-graph", paths[name]), pipeline("torch", paths[name])
        rows[f"to_{name}"] = {
            "wall_ms": wall_ms,
            "max_abs_change": (now - before).abs().max().item(),
            "equals_a_pipeline_captured_with_it": torch.equal(now, fresh(PROMPT, **kw)),
            "max_abs_vs_torch_backend": (now.float() - eager(PROMPT, **kw).float()).abs().max().item(),
        }
        del fresh, eager
        torch.cuda.empty_cache()
        return now

    with_a = checked("a", timed(lambda: pipe.load_lora(paths["a"], name="a")), base)
    rows["load_b_at_scale_0_wall_ms"] = timed(lambda: pipe.load_lora(paths["b"], scale=0.0, name="b"))
    with_b = checked("b", timed(lambda: pipe.set_lora_scales({"a": 0.0, "b": 1.0})), with_a)
    rows["back_to_a_wall_ms"] = timed(lambda: pipe.set_lora_scales({"a": 1.0, "b": 0.0}))
    rows["back_to_a_equals_a"] = torch.equal(image(), with_a)
    rows["unload_wall_ms"] = timed(pipe.unload_lora)
    rows["unloaded_equals_the_image_before_any_lora"] = torch.equal(image(), base)
    rows["b_changed_the_image"] = not torch.equal(with_b, with_a)
    rows["graphs_captured_after_the_first_image"] = len(pipe.backend.buckets()) - buckets
    rows["switch_below_one_generation"] = rows["to_b"]["wall_ms"] < rows["generation"]["median_ms"]
    return rows


def controlnet_rows(unet, cfg: UNetConfig, size: int, compile_peer: bool) -> dict:
    from diffusers import ControlNetModel as PeerControlNet
    from diffusers import UNet2DConditionModel as PeerUNet

    from benchmarks.diffusers_configs import SD15

    controlnet, cn_config = controlnet_from_unet(unet.float().cpu())
    unet.cuda().half()
    with torch.no_grad():  # nonzero output convs, so both run the same arithmetic on nonzero residuals
        for p in controlnet.parameters():
            if not p.any():
                p.normal_(0, 1e-3)
    controlnet = controlnet.cuda().half().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, generator=g).cuda().half()
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).cuda().half()
    image = torch.rand(2, 3, size, size, generator=g).cuda().half()
    t, scale = torch.tensor(999.0, device="cuda"), torch.tensor(1.0, device="cuda")

    def ours():
        down, mid = controlnet(x, t, ctx, image, scale)
        return unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    rows = {"batch": "2 (CFG)", "size": size}
    rows["diffrt_eager"], rows["diffrt_eager_unet_only"] = time_ms(ours), time_ms(lambda: unet(x, t, ctx))
    graph, _ = capture(ours)
    rows["diffrt_graph"] = time_ms(graph.replay)
    graph_unet, _ = capture(lambda: unet(x, t, ctx))
    rows["diffrt_graph_unet_only"] = time_ms(graph_unet.replay)
    peer_unet = PeerUNet(**{k: v for k, v in SD15.items() if not k.startswith("_")})
    peer_unet.load_state_dict({k: v.float() for k, v in unet.state_dict().items()})
    peer_cn = PeerControlNet(**{k: v for k, v in cn_config.items() if not k.startswith("_")})
    peer_cn.load_state_dict({k: v.float() for k, v in controlnet.state_dict().items()})
    peer_unet, peer_cn = (m.cuda().half().eval().requires_grad_(False) for m in (peer_unet, peer_cn))

    def peer(u, c):
        def step():
            down, mid = c(x, t, ctx, image, conditioning_scale=1.0, return_dict=False)
            return u(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                     return_dict=False)[0]  # fmt: skip

        return step

    rows["diffusers_eager"] = time_ms(peer(peer_unet, peer_cn))
    rows["diffusers_eager_unet_only"] = time_ms(lambda: peer_unet(x, t, ctx, return_dict=False)[0])
    rows["diffrt_vs_diffusers_max_rel_error"] = max_rel_error(ours(), peer(peer_unet, peer_cn)())
    if compile_peer:
        t0 = time.perf_counter()
        cu, cc = torch.compile(peer_unet), torch.compile(peer_cn)
        step = peer(cu, cc)
        step()
        torch.cuda.synchronize()
        rows["diffusers_compile_seconds"] = time.perf_counter() - t0
        rows["diffusers_compile"] = time_ms(step)
        rows["diffusers_compile_unet_only"] = time_ms(lambda: cu(x, t, ctx, return_dict=False)[0])
    for name in ("diffrt_eager", "diffrt_graph", "diffusers_eager", "diffusers_compile"):
        if name in rows:
            rows[f"{name}_controlnet_adds_ms"] = rows[name]["median_ms"] - rows[f"{name}_unet_only"]["median_ms"]
    return rows


def controlnet_pipeline_rows(size: int, compile_peer: bool) -> dict:
    import copy

    import diffusers

    from benchmarks.peers import compile_pipeline, diffusers_pipeline
    from diffrt.images import to_pil
    from diffrt.pipeline import Pipeline

    plain = Pipeline.from_pretrained("sd15", device="cuda", dtype=torch.float16)
    controlled = Pipeline.from_pretrained("sd15", device="cuda", dtype=torch.float16)  # the same weights (seed 0)
    controlnet, config = controlnet_from_unet(copy.deepcopy(plain.components.unet).float().cpu())
    with torch.no_grad():  # nonzero output convs, so its residuals are real work
        for p in controlnet.parameters():
            if not p.any():
                p.normal_(0, 1e-3)
    controlled.load_controlnet(controlnet)
    control = to_pil(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(4)))[0]  # for both
    kw = {"height": size, "width": size, "guidance_scale": 7.5, "seed": 0}

    def wall(fn, reps: int = 10) -> float:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return float(torch.tensor(times).median())

    def per_step(name: str, run) -> None:
        t0 = time.perf_counter()
        run(4)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = {steps: wall(lambda steps=steps: run(steps)) for steps in (4, 8)}
        rows[name] = {"4_steps_ms": ms[4], "8_steps_ms": ms[8], "per_step_ms": (ms[8] - ms[4]) / 4,
                      "first_call_s": first_s}  # fmt: skip

    rows = {"size": size, "cfg": 7.5, "sampler": "euler"}
    per_step("diffrt_fast_path", lambda n: controlled(PROMPT, steps=n, sampler="euler", control_image=control,
                                                      output_type="pt", **kw))  # fmt: skip
    per_step("diffrt_fast_path_without", lambda n: plain(PROMPT, steps=n, sampler="euler", output_type="pt", **kw))
    if compile_peer:
        base = diffusers_pipeline(plain, "sd15")
        peer_cn = diffusers.ControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        peer_cn.load_state_dict({k: v.float() for k, v in controlnet.state_dict().items()})
        peer = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=peer_cn.cuda().half())
        peer.set_progress_bar_config(disable=True)
        compile_pipeline(peer)
        peer.controlnet = torch.compile(peer.controlnet, mode="reduce-overhead", fullgraph=True)
        peer_kw = {"output_type": "pt", "height": size, "width": size, "guidance_scale": 7.5}
        base.unet = peer.unet  # compiled once; the VAE (and its compiled decode) is the same object in both
        with torch.inference_mode():
            per_step("diffusers_compile", lambda n: peer(PROMPT, image=control, num_inference_steps=n, **peer_kw))
            per_step("diffusers_compile_without", lambda n: base(PROMPT, num_inference_steps=n, **peer_kw))
    for name in ("diffrt_fast_path", "diffusers_compile"):
        if name in rows:
            rows[f"{name}_controlnet_adds_per_step_ms"] = (
                rows[name]["per_step_ms"] - rows[f"{name}_without"]["per_step_ms"]
            )
    if "diffusers_compile" in rows:
        rows["per_step_speedup_vs_compile"] = (
            rows["diffusers_compile"]["per_step_ms"] / rows["diffrt_fast_path"]["per_step_ms"]
        )
    return rows


@torch.no_grad()  # not inference_mode: tensors made under it cannot be written in place outside it
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--only", choices=("lora", "pipeline", "controlnet", "controlnet_pipeline"), default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip diffusers + torch.compile (its compile is slow)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--json", default="adapters.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/adapters.py needs a CUDA GPU")
    cfg = UNetConfig.preset("sd15")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cfg).cuda().half().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    lat = args.size // 8
    x = torch.randn(1, 4, lat, lat, generator=g).cuda().half()
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).cuda().half()
    t = torch.tensor(999.0, device="cuda")
    env = {**environment(args.commit), "dtype": "float16", "preset": "sd15", "size": args.size}
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        sections = {
            "lora": lambda: lora_rows(unet, x, t, ctx, args.rank, folder),
            "pipeline": lambda: pipeline_rows(args.rank, args.size, folder),
            "controlnet": lambda: controlnet_rows(unet, cfg, args.size, not args.no_compile),
            "controlnet_pipeline": lambda: controlnet_pipeline_rows(args.size, not args.no_compile),
        }
        for name, rows in sections.items():
            if args.only in (None, name):
                # each section names its call: a results file may hold sections measured in different calls
                report[name] = {**rows(), "environment": env}
                print(json.dumps(report[name], indent=1))
    write_json(args.json, report, indent=2)
    return report


if __name__ == "__main__":
    main()
