"""`diffrt export` (a model to an ONNX export folder) and `diffrt build-engine` (TensorRT engines from one)."""

import argparse
import json
import os
import sys

COMPONENT_NAMES = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model's components to ONNX, checked on ONNX Runtime")
    p.add_argument("model", help="diffusers folder, single .safetensors file, or preset name (random weights)")
    p.add_argument("-o", "--output", required=True, help="export folder (created; its manifest is written last)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16",
                   help="fp16 keeps softmax, normalization statistics and the SDXL VAE in fp32")  # fmt: skip
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..20 (default 18)")
    p.add_argument("--components", nargs="+", choices=COMPONENT_NAMES, default=None, help="default: all present")
    p.add_argument("--vae", default=None, help="a VAE or TAESD checkpoint to export instead of the model's own")
    p.add_argument("--device", default=None, help="where to trace and check (default: cuda when available)")
    p.add_argument("--check-at", nargs="+", default=None, metavar="B,H,W[,S]",
                   help="shapes (pixels, tokens) to check each file at (default 1,64,96,77 2,48,32,20)")  # fmt: skip
    p.add_argument("--no-check", action="store_true", help="skip running the files on ONNX Runtime")
    p.add_argument("--tolerance", type=float, default=None, help="max relative error (default 1e-4 fp32, 2e-2 fp16)")
    p.add_argument("--seed", type=int, default=0, help="a preset's random weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file checkpoint")
    p.add_argument("--variant", default=None)
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=run_export)

    b = subparsers.add_parser("build-engine", help="build TensorRT engines from an export folder (cached)")
    b.add_argument("folder", help="a `diffrt export` folder")
    b.add_argument("--min", default=None, metavar="B,H,W", help="dynamic profile: smallest batch, height, width")
    b.add_argument("--opt", default=None, metavar="B,H,W", help="dynamic profile: the shape tuned for")
    b.add_argument("--max", default=None, metavar="B,H,W", help="dynamic profile: largest")
    b.add_argument("--static", default=None, metavar="B,H,W", help="static profile (fastest; CUDA-graph capture)")
    precision = b.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 (an fp32 export gets the builder flag)")
    precision.add_argument("--bf16", action="store_true", help="bf16 builder flag on an fp32 export")
    b.add_argument("--no-cfg", action="store_true", help="the UNet's batch is the images' (no guidance batch)")
    b.add_argument("--components", nargs="+", choices=COMPONENT_NAMES, default=None)
    b.add_argument("--engine-dir", default=None, help="engine cache folder (default FOLDER/engines)")
    b.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    b.add_argument("--timing-cache", default=None, help="timing cache file, read and updated (full TensorRT)")
    b.add_argument("--flavour", choices=("tensorrt", "tensorrt_rtx"), default=None, help="default: what imports")
    b.add_argument("--json", default=None, help="also write the results (times, sizes, target) to this file")
    b.set_defaults(func=run_build_engine)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from diffrt.export.exporter import DTYPES, export_model
    from diffrt.export.ort_check import DEFAULT_CHECKS, CheckShape

    checks = () if args.no_check else tuple(map(CheckShape.parse, args.check_at)) if args.check_at else DEFAULT_CHECKS
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = export_model(
        args.model, args.output, seed=args.seed, variant=args.variant, allow_pickle=args.allow_pickle,
        tokenizer=args.tokenizer, vae=args.vae, dtype=DTYPES[args.dtype], opset=args.opset, names=args.components,
        device=device, checks=checks, tolerance=args.tolerance,
    )  # fmt: skip
    for name, entry in manifest["components"].items():
        size = entry["bytes"] + sum(d["bytes"] for d in entry["external_data"])
        worst = max((max(c["max_rel_error"].values()) for c in entry["checked"]), default=None)
        check = f"max rel. error {worst:.1e} at {len(entry['checked'])} shapes" if worst is not None else "unchecked"
        data = f" + {entry['external_data'][0]['file']}" if entry["external_data"] else ""
        print(f"{name:15s} {entry['file']}{data}  {size / 2**20:.1f} MiB  {entry['dtype']}  {check}")
    print(f"wrote {os.path.join(args.output, 'manifest.json')}")
    return 0


def profile_from_args(args: argparse.Namespace):
    from diffrt.export.profiles import DYNAMIC_256_1024, Profile

    cfg = not args.no_cfg
    dynamic = [args.min, args.opt, args.max]
    if args.static is not None:
        if any(dynamic):
            raise ValueError("--static excludes --min/--opt/--max; give one or the other")
        return Profile.static(Profile.parse(args.static), cfg)
    if not any(dynamic):
        return Profile(DYNAMIC_256_1024.min, DYNAMIC_256_1024.opt, DYNAMIC_256_1024.max, cfg)
    if not all(dynamic):
        raise ValueError("a dynamic profile needs all of --min, --opt and --max (or use --static B,H,W)")
    return Profile(*(Profile.parse(s) for s in dynamic), cfg)


def run_build_engine(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from diffrt.export.engines import build_engines
    from diffrt.export.files import write_atomically
    from diffrt.export.tensorrt_build import detect_target, import_tensorrt, make_builder

    profile = profile_from_args(args)
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "onnx"
    try:
        trt, flavour = import_tensorrt(args.flavour)
        target = detect_target(trt, flavour)
    except (ImportError, RuntimeError) as e:
        raise ValueError(str(e)) from e
    builder = make_builder(trt, flavour, opt_level=args.opt_level, timing_cache=args.timing_cache)
    print(f"{flavour} {target.version} on {target.gpu} (compute capability {target.compute_capability}); "
          f"profile {profile.as_json()}", file=sys.stderr)  # fmt: skip

    def report(name, r):
        how = f"built in {r.build_seconds:.1f} s ({r.reason})" if r.built else "cached"
        print(f"{name:15s} {how}  {r.bytes / 2**20:.1f} MiB  {r.path}")

    results = build_engines(args.folder, profile, target=target, builder=builder, precision=precision,
                            components=args.components, cache_dir=args.engine_dir, opt_level=args.opt_level,
                            on_result=report)  # fmt: skip
    if args.json:
        record = {"target": asdict(target), "profile": profile.as_json(), "precision": precision,
                  "opt_level": args.opt_level, "folder": os.path.abspath(args.folder),
                  "engines": {n: {"built": r.built, "reason": r.reason, "build_seconds": r.build_seconds,
                                  "bytes": r.bytes, "path": r.path} for n, r in results.items()}}  # fmt: skip
        write_atomically(args.json, json.dumps(record, indent=1).encode())
    return 0
