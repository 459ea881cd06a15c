"""Real-size ONNX checks and the onnxruntime backend's latency, for the device (benchmarks/export_device.sh runs it).

    python benchmarks/onnx_device.py export  --presets sd21 sdxl --root /tmp/diffrt-exports --out OUT/onnx_export.json
    python benchmarks/onnx_device.py latency --preset sd21 --size 512 --root /tmp/diffrt-exports --out OUT/x.json

`export`: each preset (real architecture, random weights, seed 0) exported in fp16 by the same code as `diffrt export`
(the SDXL UNet with external data), every file checked on ONNX Runtime (CUDA provider where onnxruntime-gpu is
installed) against our torch module in fp32 on the same weights, at the sizes below; the manifest's numbers, export
and check times and file sizes go to the JSON, with whether each error is within the stated fp16 tolerance (2e-2).

`latency`: end to end on the same weights (diffrt.latency.end_to_end, the runs of diffrt.latency.RUNS named by --runs,
batch 1, prompt to image tensor, text encoder included): diffrt's torch backend, its fast path (cuda-graph), the
onnxruntime backend (IO binding; and with ORT's CUDA graph), diffusers + torch.compile (--peers, benchmarks/peers.py);
then the UNet step (CFG batch 2) and the VAE decode alone on ORT (plain, CUDA graph, and after ORT's own Stable
Diffusion fusions, --fusions) beside the fast path's graph replays of the same (diffrt.latency.component_times).

`export` runs on a CPU too (`--device cpu` with tiny presets) to try the script before spending device time.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment
from benchmarks.results_file import write_json
from diffrt.export.ort_check import CheckShape

CHECKS = {"sd21": (CheckShape(1, 512, 512, 77), CheckShape(2, 768, 768, 77)),
          "sdxl": (CheckShape(1, 1024, 1024, 77), CheckShape(2, 512, 768, 77))}  # fmt: skip
FP16_TOLERANCE = 2e-2


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
    env = {**environment(args.commit), **ort_info()}
    for preset in results.values():  # every row names its GPU, versions and commit, as benchmarks/latency.py's do
        preset.get("components", {}).update({k: {**env, **row} for k, row in preset.get("components", {}).items()})
    return {"environment": env, "exports": results}


def run_latency(args) -> dict:
    from benchmarks import peers
    from diffrt import latency
    from diffrt.backends.onnxruntime import OnnxRuntimeBackend, OrtRunner
    from diffrt.export.exported import open_export
    from diffrt.export.graphs import sample_inputs
    from diffrt.pipeline import Pipeline
    from diffrt.request import GenerationRequest

    folder, size = os.path.join(args.root, args.preset), args.size
    env = {**environment(args.commit), **ort_info(), "timing": "diffrt.latency.end_to_end (e2e rows), CUDA events "
           "after 3 warm-up calls (ORT components), graph replays (the fast path's components)"}  # fmt: skip
    rows = Rows(args.out, {"environment": env, "preset": args.preset, "size": size}, env)

    def add(name: str, what: str, measure) -> None:
        try:
            timing = measure()
        except Exception as e:  # one failing row must not lose the others
            print(f"{name:34s} {what:16s} FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"impl": name, "what": what, "error": f"{type(e).__name__}: {e}"})
            return
        rows.append({"impl": name, "what": what, "preset": args.preset, "height": size, "width": size, **timing})
        print(f"{name:34s} {what:16s} {timing['median_ms']:9.2f} ms  p20 {timing['p20_ms']:.2f} "
              f"p80 {timing['p80_ms']:.2f}", flush=True)  # fmt: skip

    def requests():
        for run in args.runs:
            sampler, steps, guidance = latency.RUNS[run]
            yield f"e2e {run}", GenerationRequest(latency.PROMPT, height=size, width=size, sampler=sampler,
                                                  steps=steps, guidance_scale=guidance)  # fmt: skip

    # 1. End to end (diffrt.latency.end_to_end: prompt to image tensor, text encoder included), same weights (seed 0,
    # as exported): the torch reference, the fast path, the onnxruntime backend plain and with ORT's CUDA graph.
    pipes = {
        "diffrt torch eager": lambda: Pipeline.from_pretrained(args.preset, device="cuda", dtype=torch.float16,
                                                               backend="torch"),
        "diffrt cuda-graph (fast path)": lambda: Pipeline.from_pretrained(args.preset, device="cuda",
                                                                          dtype=torch.float16, backend="cuda-graph"),
        "onnxruntime (IO binding)": lambda: Pipeline.from_export(folder, device="cuda",
                                                                 backend=OnnxRuntimeBackend()),
        "onnxruntime + ORT CUDA graph": lambda: Pipeline.from_export(folder, device="cuda",
                                                                     backend=OnnxRuntimeBackend(cuda_graph=True)),
    }  # fmt: skip
    for name, make in pipes.items():
        try:
            pipe = make()
        except Exception as e:  # (ORT's CUDA provider may be missing)
            rows.append({"impl": name, "what": "pipeline", "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        for what, request in requests():
            add(name, what, lambda pipe=pipe, request=request: latency.end_to_end(pipe, request, args.repeats))
        if name.startswith("diffrt cuda-graph"):
            for part, t in latency.component_times(pipe, 1, size, size, cfg=True).items():
                rows.append({"impl": name, "what": part, "preset": args.preset, "height": size, "width": size, **t})
        del pipe
    if args.peers:  # diffusers + torch.compile on the same weights (benchmarks/peers.py, as benchmarks/latency.py)
        ours = Pipeline.from_pretrained(args.preset, device="cuda", dtype=torch.float16, backend="torch")
        peer = peers.diffusers_pipeline(ours, args.preset)
        peers.compile_pipeline(peer)
        for run in args.runs:
            add("diffusers + torch.compile", f"e2e {run}", lambda run=run: peers.end_to_end(peer, run, 1, size, size))
        del peer, ours
    torch.cuda.empty_cache()

    # 2. The UNet step (CFG batch 2) and the VAE decode alone on ORT, plain, with its CUDA graph, and after ORT's own
    # Stable Diffusion fusions; the fast path's graph replays of the same (section 1) are beside them.
    model = open_export(folder, ("unet", "vae_decoder"))
    lat = {"batch": 2, "sequence": 77, "height": size // 8, "width": size // 8}
    for name, axes, what in (("unet", lat, "unet_step"), ("vae_decoder", {**lat, "batch": 1}, "decode")):
        spec = model.graph(name)
        feeds = {k: v.cuda() for k, v in sample_inputs(spec, axes).items()}
        files = {"ort": model.model_path(name)}
        if args.fusions:
            files["ort + SD fusions"] = fused_copy(model.model_path(name), name, args.fusions_dir)
        for label, path in files.items():
            for graph in (False, True):
                impl = f"{label}{' + CUDA graph' if graph else ''}"
                if path is None:
                    rows.append({"impl": impl, "what": what, "error": "ORT's optimizer refused the model"})
                    continue
                runner = None
                try:
                    runner = OrtRunner(path, spec, torch.device("cuda"), cuda_graph=graph)
                except Exception as e:
                    print(f"{impl:34s} {what:16s} FAILED {type(e).__name__}: {e}", flush=True)
                    rows.append({"impl": impl, "what": what, "error": f"{type(e).__name__}: {e}"})
                    continue
                add(impl, what, lambda r=runner, f=feeds: peers.event_times(lambda: r(f), args.repeats * 2))
                del runner
    return rows.result()


class Rows(list):
    """The latency rows, each stamped with the environment (GPU, versions, commit), and the JSON rewritten after
    every row: a call that runs out of time keeps what it measured."""

    def __init__(self, out: str, head: dict, env: dict) -> None:
        super().__init__()
        self.out, self.head, self.env = Path(out), head, env

    def append(self, row: dict) -> None:
        super().append({**self.env, **row})
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.out, self.result())

    def result(self) -> dict:
        return {**self.head, "rows": list(self)}


def fused_copy(path: str, component: str, out_dir: str) -> str | None:
    """The model after ONNX Runtime's Stable Diffusion fusions (onnxruntime.transformers.optimizer, model_type "unet"
    or "vae": GroupNorm, attention, BiasSplitGelu, ...), saved in out_dir; None (and a note) where it refuses."""
    from onnxruntime.transformers.optimizer import optimize_model

    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, f"{component}.fused.onnx")
    try:
        fused = optimize_model(path, model_type="unet" if component == "unet" else "vae", opt_level=0,
                               use_gpu=True, only_onnxruntime=False)  # fmt: skip
        fused.save_model_to_file(target, use_external_data_format=os.path.exists(path + ".data"))
        print(f"fused {component}: {fused.get_fused_operator_statistics()}", flush=True)
        return target
    except Exception as e:  # reported, not fatal: the plain rows stand without it
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
    lat.add_argument("--runs", nargs="+", default=["1 step", "25 steps CFG"], help="diffrt.latency.RUNS names")
    lat.add_argument("--repeats", type=int, default=10)
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
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
