"""`diffrt bench`: the latency table of benchmarks/latency.py, for your model on your GPU (diffrt only, no peers)."""

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time your model on this GPU: components and end to end per size")
    p.add_argument(
        "--model", default=None, help="diffusers folder, single file or preset (default: the embedded model)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file checkpoint")
    p.add_argument(
        "--sizes",
        default="512,1024",
        help="sizes in pixels, comma-separated: a square's side or HEIGHTxWIDTH (512,768x1344)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", default="1 step,LCM 4 steps", help="of: 1 step, LCM 4 steps, 25 steps CFG")
    p.add_argument("--backend", default=None, help="default: cuda-graph")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from diffrt.latency import RUNS, parse_sizes, size_label

    runs = [r.strip() for r in args.runs.split(",")]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; choose from: {', '.join(RUNS)}")
    sizes = parse_sizes(args.sizes)
    if not torch.cuda.is_available():
        raise ValueError("diffrt bench times CUDA-graph replays and needs a CUDA GPU; this machine has none")

    from tqdm import tqdm

    from diffrt import latency
    from diffrt.cli_generate import DEFAULT_MODEL
    from diffrt.pipeline import Pipeline
    from diffrt.request import GenerationRequest

    pipe = Pipeline.from_pretrained(args.model or DEFAULT_MODEL, device="cuda", dtype=getattr(torch, args.dtype),
                                    tokenizer=args.tokenizer, backend=args.backend)  # fmt: skip
    rows = []
    with tqdm(total=len(sizes) * (1 + len(runs)), desc="bench", unit="cell", file=sys.stderr) as bar:
        for height, width in sizes:
            size = {"size": size_label(height, width), "height": height, "width": width}
            for name, t in latency.component_times(pipe, args.batch, height, width, cfg=False).items():
                rows.append({**size, "what": name, **t})
            bar.update()
            for run in runs:
                sampler, steps, guidance = RUNS[run]
                request = GenerationRequest(latency.PROMPT, height=height, width=width, batch=args.batch,
                                            sampler=sampler, steps=steps, guidance_scale=guidance)  # fmt: skip
                rows.append({**size, "what": f"end to end, {run}", **latency.end_to_end(pipe, request)})
                bar.update()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, batch {args.batch}, backend {pipe.backend.name}")
    print(f"{'size':>9}  {'what':28s} {'median ms':>10} {'p20':>8} {'p80':>8}")
    for r in rows:
        sound = r.get("image_finite", True) and r.get("image_min_std", 1.0) > 0  # components' rows have no image
        print(
            f"{r['size']:>9}  {r['what']:28s} {r['median_ms']:>10.3f} {r['p20_ms']:>8.3f} {r['p80_ms']:>8.3f}"
            + ("" if sound else "  (image NaN or flat)")
        )
    if args.json:
        from diffrt.export.files import write_atomically

        write_atomically(args.json, json.dumps(rows, indent=1).encode())  # a run cut short leaves no torn file
    return 0
