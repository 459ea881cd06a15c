"""Real-size ONNX checks and the onnxruntime backend's latency, for the device (benchmarks/export_device.sh runs it).

    python benchmarks/onnx_device.py export  --presets sd21 sdxl --root /tmp/diffrt-exports --out OUT/onnx_export.json
    python benchmarks/onnx_device.py latency --preset sd21 --size 512 --root /tmp/diffrt-exports --out OUT/x.json

`export`: each preset (real architecture, random weights, seed 0) exported in fp16 by the same code as `diffrt export`
(the SDXL UNet with external data), every file checked on ONNX Runtime (CUDA provider where onnxruntime-gpu is
installed) against our torch module in fp32 on the same weights, at the sizes below; the manifest's numbers, export
and check times and file sizes go to the JSON, with whether each error is within the stated fp16 tolerance (2e-2).

`latency`: one generation (4 Euler steps, CFG 5, batch 1, cached prompt) end to end on the same weights: diffrt's
torch and triton backends, the onnxruntime backend (IO binding; and with ORT's CUDA graph), diffusers + torch.compile
(--peers); then the UNet step (CFG batch 2) and the VAE decode alone on ORT (plain, CUDA graph, and after ORT's own
Stable Diffusion graph fusions, onnxruntime.transformers.optimizer model_type "unet"/"vae") beside torch eager.
Median and 20th/80th percentile ms of CUDA-event-timed calls after warm-up; each image's max abs difference from the
torch backend's.

Runs on a CPU too (`--device cpu` with tiny presets) to try the script before spending device time.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.environment import environment
from diffrt.export.ort_check import CheckShape

CHECKS = {"sd21": (CheckShape(1, 512, 512, 77), CheckShape(2, 768, 768, 77)),
          "sdxl": (CheckShape(1, 1024, 1024, 77), CheckShape(2, 512, 768, 77))}  # fmt: skip
FP16_TOLERANCE = 2e-2
CALL = {"steps": 4, "sampler": "euler", "guidance_scale": 5.0, "seed": 0, "output_type": "pt"}


def ort_info() -> dict:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def run_export(args) -> dict:
    from diffrt.export.exporter import export_model

    results = {}
    for preset in args.presets:
        folder = os.path.join(args.root, preset)
        checks = CHECKS.get(preset, (CheckShape(1, 64, 64), CheckShape(2, 48, 32, 20)))
        start = time.perf_counter()
        try:  # tolerance 1.0: record the measured errors; the JSON compares them with FP16_TOLERANCE
            manifest = export_model(preset, folder, dtype=torch.float16, device=args.device, checks=checks,
                                    tolerance=1.0, progress=False)  # fmt: skip
        except Exception as e:  # a device run reports every failure rather than stop
            results[preset] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{preset}: FAILED {e}", flush=True)
            continue
        seconds = time.perf_counter() - start
        rows = {}
        for name, entry in manifest["components"].items():
            worst = max(max(c["max_rel_error"].values()) for c in entry["checked"])
            tol = FP16_TOLERANCE if entry["dtype"] == "float16" else 1e-4
            rows[name] = {
                "dtype": entry["dtype"],
                "bytes": entry["bytes"] + sum(d["bytes"] for d in entry["external_data"]),
                "external_data": [d["file"] for d in entry["external_data"]],
                "export_seconds": entry["export_seconds"],
                "check_seconds": entry.get("check_seconds"),
                "checked": [
                    {"shape": c["shape"], "provider": c["providers"][0], "max_rel_error": c["max_rel_error"]}
                    for c in entry["checked"]
                ],  # fmt: skip
                "worst_max_rel_error": worst,
                "tolerance": tol,
                "within_tolerance": worst <= tol,
            }
            print(f"{preset} {name:15s} {entry['dtype']:8s} {rows[name]['bytes'] / 2**30:.2f} GiB "
                  f"export {entry['export_seconds']:.0f} s  worst err {worst:.2e} (tol {tol:g}) on "
                  f"{entry['checked'][0]['providers'][0]}", flush=True)  # fmt: skip
        results[preset] = {"folder": folder, "seconds": round(seconds, 1), "components": rows}
    return {"environment": {**environment(args.commit), **ort_info()}, "exports": results}


def timed(fn, warmup: int, reps: int, cuda: bool) -> dict:
    """Median and 20th/80th percentile ms of `fn` (CUDA events on the GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "reps": reps}


def diffusers_pipeline(torch_pipe, compile_: bool):
    """diffusers' own pipeline on the torch pipeline's weights (its modules, loaded into diffusers' classes), fed
    the same prompt embeddings; UNet and VAE decoder under torch.compile."""
    import diffusers

    from benchmarks.diffusers_configs import SD15, SD21, SDXL

    c, spec = torch_pipe.components, torch_pipe.spec
    configs = {768: SD15, 1024: SD21, 2048: SDXL}
    unet = diffusers.UNet2DConditionModel(**configs[c.unet.config.cross_attention_dim])
    unet.load_state_dict(c.unet.state_dict())
    v = c.vae.config
    vae = diffusers.AutoencoderKL(
        latent_channels=v.latent_channels, block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * len(v.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(v.block_out_channels), scaling_factor=v.scaling_factor,
        force_upcast=v.force_upcast,
    )  # fmt: skip
    vae.load_state_dict(c.vae.state_dict())
    scheduler = diffusers.EulerDiscreteScheduler.from_config(c.scheduler_config)
    dtype = torch_pipe.dtype
    unet, vae = unet.to("cuda", dtype).eval(), vae.to("cuda", torch.float32 if spec.memory.vae_upcast else dtype).eval()
    if spec.sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=unet, scheduler=scheduler)  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if compile_:
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode)
    return pipe


def run_latency(args) -> dict:
    from diffrt.backends.onnxruntime import OnnxRuntimeBackend, OrtRunner
    from diffrt.export.exported import open_export
    from diffrt.export.graphs import sample_inputs
    from diffrt.models.ops import TORCH_OPS, set_ops
    from diffrt.pipeline import Pipeline

    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    folder = os.path.join(args.root, args.preset)
    size = {"height": args.size, "width": args.size}
    call = {**CALL, **size, "steps": args.steps}
    prompt = "a photo of a cat"
    rows, images = [], {}

    def row(name, fn, what="pipeline", **extra):
        try:
            timing = timed(fn, args.warmup, args.reps, cuda)
        except Exception as e:  # one failing row must not lose the others
            print(f"{name:40s} FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"name": name, "what": what, "error": f"{type(e).__name__}: {e}"})
            return
        rows.append({"name": name, "what": what, "preset": args.preset, **size, **timing, **extra})
        print(f"{name:40s} {timing['median_ms']:9.2f} ms  p20 {timing['p20_ms']:.2f} p80 {timing['p80_ms']:.2f}",
              flush=True)  # fmt: skip

    # 1. End to end, same weights (seed 0, as exported).
    ref = Pipeline.from_pretrained(args.preset, device=args.device, dtype=dtype, backend="torch")
    images["torch"] = ref(prompt, **call)
    row("diffrt torch eager", lambda: ref(prompt, **call))
    if cuda:
        fast = Pipeline.from_components(ref.components, device="cuda", dtype=dtype, backend="triton")  # same modules
        images["triton"] = fast(prompt, **call)
        row("diffrt triton eager (fast path)", lambda: fast(prompt, **call))
        for module in ref.components.modules().values():  # the modules back on torch's kernels for the rows below
            set_ops(module, TORCH_OPS)
    for graph in (False, True) if cuda else (False,):
        name = "onnxruntime" + (" + ORT CUDA graph" if graph else " (IO binding)" if cuda else " cpu")
        try:
            backend = OnnxRuntimeBackend(cuda_graph=graph)
            pipe = Pipeline.from_export(folder, device=args.device, dtype=dtype, backend=backend)
            images[name] = pipe(prompt, **call)
        except Exception as e:
            print(f"{name:40s} FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"name": name, "what": "pipeline", "error": f"{type(e).__name__}: {e}"})
            continue
        row(name, lambda pipe=pipe: pipe(prompt, **call))
        del pipe
    if args.peers and cuda:
        embeds, pooled = ref.encode_prompt([prompt])
        neg, neg_pooled = torch.zeros_like(embeds), (torch.zeros_like(pooled) if pooled is not None else None)
        kw = {"prompt_embeds": embeds, "negative_prompt_embeds": neg, "num_inference_steps": args.steps,
              "guidance_scale": CALL["guidance_scale"], "output_type": "pt", **size}  # fmt: skip
        if pooled is not None:
            kw.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        peer = diffusers_pipeline(ref, compile_=True)
        start = time.perf_counter()
        peer(**kw)
        compile_s = time.perf_counter() - start
        row("diffusers + torch.compile", lambda: peer(**kw), compile_seconds=round(compile_s, 1))
        del peer
    for r in rows:
        match = {"diffrt torch eager": "torch", "diffrt triton eager (fast path)": "triton"}.get(r["name"], r["name"])
        if match in images and r["what"] == "pipeline":
            r["max_abs_diff_vs_torch_image"] = float((images[match].float() - images["torch"].float()).abs().max())

    # 2. Components alone at this size: the UNet step under CFG (batch 2) and the VAE decode (batch 1).
    model = open_export(folder, ("unet", "vae_decoder"))
    device = torch.device(args.device)
    lat = {"batch": 2, "sequence": 77, "height": args.size // 8, "width": args.size // 8}
    for name, axes in (("unet", lat), ("vae_decoder", {**lat, "batch": 1})):
        spec = model.graph(name)
        feeds = {k: v.to(device) for k, v in sample_inputs(spec, axes).items()}
        files = {"": model.model_path(name)}
        if cuda and args.fusions:
            files[" + ORT SD fusions"] = fused_copy(model.model_path(name), name, args.fusions_dir)
        for label, path in files.items():
            if path is None:
                continue
            for graph in (False, True) if cuda else (False,):
                try:
                    run = OrtRunner(path, spec, device, cuda_graph=graph)
                except Exception as e:
                    rows.append({"name": f"ort {name}{label}", "what": name, "error": f"{type(e).__name__}: {e}"})
                    continue
                shapes = {k: list(v.shape) for k, v in feeds.items() if v.ndim}
                row(f"ort {name}{label}{' + CUDA graph' if graph else ''}", lambda run=run, f=feeds: run(f), what=name,
                    **shapes)  # fmt: skip
                del run
        module = ref.components.unet if name == "unet" else ref.components.vae
        row(f"torch eager {name}", torch_component(module, name, feeds), what=name)
    return {"environment": {**environment(args.commit), **ort_info(), "timing": f"warmup {args.warmup}, "
            f"{args.reps} reps, CUDA events" if cuda else "perf_counter"}, "call": call, "rows": rows}  # fmt: skip


def torch_component(module, name: str, feeds: dict):
    """Our torch module on the graph's inputs (cast to its dtype), as a no-argument call."""
    dtype = next(module.parameters()).dtype
    x = {k: v.to(dtype) if v.is_floating_point() and v.ndim else v for k, v in feeds.items()}

    def call():
        with torch.no_grad():
            if name == "unet":
                extra = {k: x[k] for k in ("text_embeds", "time_ids") if k in x}
                return module(x["sample"], x["timestep"], x["encoder_hidden_states"], **extra)
            return module.decode(x["latent_sample"])

    return call


def fused_copy(path: str, component: str, out_dir: str) -> str | None:
    """The model after ONNX Runtime's Stable Diffusion fusions (GroupNorm, attention, BiasSplitGelu, ...), saved
    beside a copy; None (and a note) where the optimizer refuses it."""
    from onnxruntime.transformers.optimizer import optimize_model

    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, f"{component}.fused.onnx")
    try:
        fused = optimize_model(path, model_type="unet" if component == "unet" else "vae", opt_level=0,
                               use_gpu=True, only_onnxruntime=False)  # fmt: skip
        fused.save_model_to_file(target, use_external_data_format=os.path.getsize(path) > 2**31 or os.path.exists(
            path + ".data"))  # fmt: skip
        print(f"fused {component}: {fused.get_fused_operator_statistics()}", flush=True)
        return target
    except Exception as e:
        print(f"ORT fusions refused {component}: {type(e).__name__}: {e}", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export")
    e.add_argument("--presets", nargs="+", default=["sd21", "sdxl"])
    lat = sub.add_parser("latency")
    lat.add_argument("--preset", default="sd21")
    lat.add_argument("--size", type=int, default=512)
    lat.add_argument("--steps", type=int, default=4)
    lat.add_argument("--warmup", type=int, default=2)
    lat.add_argument("--reps", type=int, default=5)
    lat.add_argument("--peers", action="store_true", help="add diffusers + torch.compile (needs diffusers)")
    lat.add_argument("--fusions", action="store_true", help="add ORT's SD graph fusions (onnxruntime-gpu)")
    lat.add_argument("--fusions-dir", default="/tmp/diffrt-fused")
    for p in (e, lat):
        p.add_argument("--root", default="/tmp/diffrt-exports")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--out", required=True)
        p.add_argument("--commit", default=None)
    args = ap.parse_args()
    result = run_export(args) if args.command == "export" else run_latency(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
