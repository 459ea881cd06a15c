"""`diffrt train {vae,text,unet,lcm,controlnet,judge,export}`: the training stages of the embedded model, resumable.

A run folder holds run.json (the architecture, fixed at the first stage by --preset) and one folder per stage. Run
the stages in order (vae and text in either order, then unet, then lcm); each one resumes from its last checkpoint
when called again with the same settings, and --max-minutes makes it save and stop in time for a 10-minute call.
"""

import argparse
import importlib
import os
import sys

TRAINERS = {  # stage -> (module, function)
    "vae": ("diffrt.train.vae", "train_vae"),
    "text": ("diffrt.train.text", "train_text"),
    "unet": ("diffrt.train.unet", "train_unet"),
    "lcm": ("diffrt.train.lcm", "train_lcm"),
    "controlnet": ("diffrt.train.controlnet", "train_controlnet"),
}
EXTRA_FLAGS = {  # stage-specific settings (recipes.STAGES[stage].extra), as --flag-name
    "vae": {"kl_weight": float, "l2_weight": float},
    "text": {},
    "unet": {"text_lr": float, "caption_dropout": float, "ema_decay": float},
    "lcm": {"w_min": float, "w_max": float, "ddim_steps": int, "ema_decay": float, "huber_c": float},
    "controlnet": {"w_min": float, "w_max": float},
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the embedded model's stages, the judge, or export a run")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in TRAINERS:
        s = stages.add_parser(stage, help=f"train the {stage} stage of a run (resumes if it has a checkpoint)")
        s.add_argument("run", help="run folder (created by the first stage)")
        s.add_argument("--preset", default=None, help="architecture of a new run: default (64x64) or tiny (tests)")
        for flag, kind in (("steps", int), ("batch", int), ("lr", float), ("warmup", int), ("seed", int)):
            s.add_argument(f"--{flag}", type=kind, default=None, help="default: recipes.STAGES")
        for flag, kind in EXTRA_FLAGS[stage].items():
            s.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None)
        s.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, else fp32")
        s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        s.add_argument("--workers", type=int, default=None, help="data processes (default: CPUs - 1 on CUDA, else 0)")
        s.add_argument("--max-minutes", type=float, default=None, help="save and stop after this long")
        s.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
        if stage == "controlnet":
            s.add_argument("--model", default=None, help="the diffusers folder it controls (default: the embedded)")
        s.set_defaults(func=run_stage)

    j = stages.add_parser("judge", help="train the adherence judge on procedural images")
    j.add_argument("--out", default=None, help="weights file (default: the package's judge.safetensors)")
    j.add_argument("--steps", type=int, default=8000)
    j.add_argument("--batch", type=int, default=64)
    j.add_argument("--lr", type=float, default=2e-3)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--threads", type=int, default=2)
    j.add_argument("--eval", type=int, default=5000, help="fresh images to measure the accuracy on afterwards")
    j.set_defaults(func=run_judge)

    e = stages.add_parser("export", help="write a finished run as a diffusers pipeline folder (fp16)")
    e.add_argument("run")
    e.add_argument("out")
    e.add_argument("--teacher", action="store_true", help="the DDIM teacher instead of the LCM student")
    e.add_argument("--max-mb", type=float, default=None, help="fail if the folder is larger")
    e.set_defaults(func=run_export)


def run_stage(args: argparse.Namespace) -> int:
    import torch

    from diffrt.train.recipes import init_run, stage_settings

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest convolutions once
    init_run(args.run, args.preset)
    precision = args.precision or ("bf16" if device.startswith("cuda") else "fp32")
    extra = {k: getattr(args, k) for k in EXTRA_FLAGS[args.stage]}
    settings = stage_settings(args.stage, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                              seed=args.seed, precision=precision, **extra)  # fmt: skip
    workers = args.workers if args.workers is not None else (max(os.cpu_count() - 1, 0) if device != "cpu" else 0)
    module, name = TRAINERS[args.stage]
    train = getattr(importlib.import_module(module), name)
    kw = {"save_every": args.save_every} if args.save_every else {}
    if getattr(args, "model", None):
        kw["model"] = args.model
    max_seconds = args.max_minutes * 60 if args.max_minutes is not None else None
    result = train(args.run, settings, device=device, workers=workers, max_seconds=max_seconds, **kw)
    state = "finished" if result["done"] else "paused (run again to continue)"
    print(f"{args.stage}: step {result['step']}/{settings.steps} {state}; {result['seconds_per_step']:.3f} s/step")
    return 0


def run_judge(args: argparse.Namespace) -> int:
    import torch

    from diffrt.train import judge

    torch.set_num_threads(args.threads)
    out = args.out or judge.JUDGE_FILE
    model = judge.train_judge(out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    for split in ("all", "held_out"):
        r = judge.evaluate(model, args.eval, split)
        print(f"judge accuracy on {r['count']} fresh {split} images: {r['accuracy']:.4f} (all attributes right)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from diffrt.train.export import export_pipeline

    which = "teacher" if args.teacher else "student"
    size = export_pipeline(args.run, args.out, which, args.max_mb)
    print(f"wrote the {which} to {args.out} ({size / 2**20:.1f} MB)", file=sys.stdout)
    return 0
