"""Prompt adherence of the trained model: the DDIM teacher (25 steps, CFG) and the LCM student (1, 2, 4 steps).

Each prompt is a caption of the procedural grammar (diffrt.train.shapes) with its exact labels; a sampler adheres on
a prompt when the judge (diffrt.train.judge) reads every attribute of its image as the prompt states it. Prompts
come from seeds no training stage draws, a share of them with held-out (color, shape) pairs, which are reported
separately. The judge's own accuracy on fresh procedural images is measured in the same run and reported beside.

    python benchmarks/adherence.py --teacher TEACHER_FOLDER --student STUDENT_FOLDER \
        --json benchmarks/results/adherence.json --grid benchmarks/results/adherence.png

Writes a JSON of the figures and a PNG grid (rows: prompts, columns: the procedural reference image, then each
sampler), and prints one line per sampler.
"""

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment
from benchmarks.results_file import write_json
from diffrt import Pipeline
from diffrt.train import judge as judge_lib
from diffrt.train import shapes

PROMPT_SEED_START = 2 * 10**9  # beyond the judge's evaluation seeds (10**9 ...) and every training stage's


def prompts(count: int, held_out_share: float) -> list[dict]:
    """`count` prompts, round(count * held_out_share) of them with a held-out pair, interleaved evenly."""
    n_held = round(count * held_out_share)
    out = []
    for i in range(count):
        held = n_held > 0 and (i * n_held) // count != ((i + 1) * n_held) // count
        split = "held_out" if held else "train"
        s = shapes.sample(PROMPT_SEED_START + i, 64, split)
        out.append({"caption": s.caption, "labels": s.labels, "held_out": held, "reference": s.image})
    return out


def sampler_runs(args) -> list[dict]:
    runs = [{"name": f"teacher ddim-{args.teacher_steps}", "model": "teacher", "sampler": "ddim",
             "steps": args.teacher_steps, "cfg": args.cfg}]  # fmt: skip
    for n in args.lcm_steps:
        runs.append({"name": f"lcm-{n}", "model": "student", "sampler": "lcm", "steps": n, "cfg": args.lcm_cfg})
    return runs


def generate(pipe: Pipeline, prompt_list: list[dict], run: dict, batch: int, seed: int) -> tuple[np.ndarray, float]:
    """uint8 images [N, H, W, 3], one per prompt (noise of prompt i: generator seed + i), and the seconds taken."""
    images, t0 = [], time.perf_counter()
    for lo in range(0, len(prompt_list), batch):
        chunk = prompt_list[lo : lo + batch]
        gen = torch.Generator(pipe.device)
        noise = torch.stack([torch.randn(_latent_shape(pipe), generator=gen.manual_seed(seed + lo + i),
                                         device=pipe.device) for i in range(len(chunk))])  # fmt: skip
        out = pipe(
            [p["caption"] for p in chunk],
            sampler=run["sampler"],
            steps=run["steps"],
            guidance_scale=run["cfg"],
            latents=noise.to(pipe.dtype),
            generator=gen,
            output_type="np",
        )
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images), time.perf_counter() - t0


def _latent_shape(pipe: Pipeline) -> tuple[int, int, int]:
    side = pipe.components.unet.config.sample_size
    return (pipe.components.unet.config.in_channels, side, side)


def score(judge, images: np.ndarray, prompt_list: list[dict]) -> dict:
    result = judge_lib.adherence(judge, images, [p["labels"] for p in prompt_list])
    matches = np.array(result["matches"])
    held = np.array([p["held_out"] for p in prompt_list])

    def share(m: np.ndarray) -> float | None:
        return float(m.mean()) if m.size else None

    return {
        "adherence": result["all"],
        "adherence_in_distribution": share(matches[~held]),
        "adherence_held_out": share(matches[held]),
        "per_head": result["per_head"],
        "failures": [p["caption"] for p, m in zip(prompt_list, matches, strict=True) if not m][:20],
    }


def grid(prompt_list: list[dict], columns: dict[str, np.ndarray], rows: int, path: str, scale: int = 2) -> None:
    """Rows: the first prompts (held-out ones marked *), columns: reference image then each sampler's image."""
    names = ["procedural", *columns]
    side = prompt_list[0]["reference"].shape[0] * scale
    text_w, head_h = 330, 16
    canvas = Image.new("RGB", (text_w + side * len(names), head_h + side * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((text_w + j * side + 2, 2), name, fill="black")
    for i, p in enumerate(prompt_list[:rows]):
        y = head_h + i * side
        draw.text((4, y + side // 2 - 6), ("* " if p["held_out"] else "") + p["caption"], fill="black")
        for j, img in enumerate([p["reference"], *(c[i] for c in columns.values())]):
            tile = Image.fromarray(img).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (text_w + j * side, y))
    canvas.save(path)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="diffusers folder of the teacher (diffrt train export --teacher)")
    p.add_argument("--student", required=True, help="diffusers folder of the LCM student (diffrt train export)")
    p.add_argument("--prompts", type=int, default=500)
    p.add_argument("--held-out-share", type=float, default=0.2)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5, help="the teacher's classifier-free guidance scale")
    p.add_argument("--lcm-steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--lcm-cfg", type=float, default=7.5, help="the student's guidance scale (its w-embedding: cfg - 1)")
    p.add_argument("--judge", default=judge_lib.JUDGE_FILE)
    p.add_argument("--judge-eval", type=int, default=2000, help="fresh procedural images to measure the judge on")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="default: fp16 on CUDA")
    p.add_argument("--rows", type=int, default=12, help="prompts in the PNG grid")
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--json", default="adherence.json")
    p.add_argument("--grid", default="adherence.png")
    args = p.parse_args(argv)
    if args.prompts < 1 or not 0 <= args.held_out_share <= 1:
        raise ValueError(f"--prompts {args.prompts} must be >= 1 and --held-out-share {args.held_out_share} in [0, 1]")

    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    judge = judge_lib.load_judge(args.judge, args.device)
    judge_acc = {s: judge_lib.evaluate(judge, args.judge_eval, s) for s in ("all", "held_out")}
    prompt_list = prompts(args.prompts, args.held_out_share)
    pipes = {
        m: Pipeline.from_pretrained(getattr(args, m), device=args.device, dtype=dtype) for m in ("teacher", "student")
    }
    results, columns = {}, {}
    for run in sampler_runs(args):
        images, seconds = generate(pipes[run["model"]], prompt_list, run, args.batch, args.seed)
        results[run["name"]] = {**run, **score(judge, images, prompt_list), "seconds": seconds,
                                "images_per_second": len(images) / seconds}  # fmt: skip
        columns[run["name"]] = images
        r = results[run["name"]]
        held = "n/a" if r["adherence_held_out"] is None else f"{r['adherence_held_out']:.3f}"
        print(
            f"{run['name']:16s} cfg {run['cfg']:<4g} adherence {r['adherence']:.3f} (held-out {held}) "
            f"{r['images_per_second']:.1f} img/s"
        )
    teacher_name, lcm4 = sampler_runs(args)[0]["name"], "lcm-4" if "lcm-4" in results else None
    env = {**environment(args.commit), "device": args.device, "dtype": str(dtype).removeprefix("torch.")}
    for row in results.values():
        row.update(env)  # every row names the GPU, versions and commit
    teacher_score = results[teacher_name]["adherence"]
    report = {
        "judge": {"file": os.path.abspath(args.judge), "sha256": _sha256(args.judge),
                  **{f"accuracy_{s}": r["accuracy"] for s, r in judge_acc.items()}, "eval_images": args.judge_eval},
        "prompts": {"count": len(prompt_list), "held_out": sum(p["held_out"] for p in prompt_list),
                    "seed_start": PROMPT_SEED_START},
        "samplers": results,
        "lcm4_over_teacher": results[lcm4]["adherence"] / teacher_score if lcm4 and teacher_score > 0 else None,
        "models": {"teacher": os.path.abspath(args.teacher), "student": os.path.abspath(args.student)},
        "environment": env,
    }  # fmt: skip
    for path in (args.json, args.grid):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(args.json, report, indent=2)
    grid(prompt_list, columns, min(args.rows, len(prompt_list)), args.grid)
    print(f"wrote {args.json} and {args.grid}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
