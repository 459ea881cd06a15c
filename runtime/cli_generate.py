"""`diffrt generate` (text-to-image and image-to-image to a file) and `diffrt samplers` (what exists).

Flags follow diffusers' argument names and stable-diffusion.cpp's short options. Every check that needs no model
runs before the model is loaded, and the image is written atomically, so a failed run leaves no file behind.
"""

import argparse
import os
import sys
import tempfile

from diffrt.validation import check_generation_args

# The embedded model (diffrt.train, issue 5): a 64x64 LCM-distilled SD-family model of procedural shapes, 23 MB.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images from a prompt (and optionally an init image)")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--negative-prompt", default=None)
    p.add_argument("-W", "--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("-H", "--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="default: 4 for lcm/tcd, 1 for turbo, else 25")
    p.add_argument(
        "--sampler", default=None, help="see `diffrt samplers` (default: what the model's scheduler implies)"
    )
    p.add_argument("--cfg", type=float, default=None, help="guidance scale; 0 or 1 turns guidance off")
    p.add_argument("--eta", type=float, default=None, help="ddim / tcd: stochastic share in [0, 1] (tcd: gamma)")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("-i", "--init-image", default=None, help="img2img: the image to start from")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image, (0, 1]")
    p.add_argument("--model", default=None, help="diffusers folder, single .safetensors file, or preset name")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a single-file checkpoint")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the model's (an SD2 single file does not say; v is assumed)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--backend", choices=("torch", "triton"), default="torch", help="triton: fused kernels (CUDA)")
    p.add_argument("--variant", default=None, help='weight file variant, e.g. "fp16"')
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.pt pickles (only from sources you trust)")
    p.add_argument("-o", "--output", required=True, help="output image path (batch > 1: NAME-0.png, NAME-1.png, ...)")
    p.set_defaults(func=run_generate)

    s = subparsers.add_parser("samplers", help="list the samplers")
    s.set_defaults(func=run_samplers)


def output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, suffix = os.path.splitext(output)
    return [f"{stem}-{i}{suffix}" for i in range(count)]


def check_output(output: str) -> None:
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"output folder {folder} does not exist; create it first or choose another -o path")
    if not output.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"output {output!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")


def save_atomically(image, path: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written image."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".diffrt-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def given(value, stand_in):
    """An option's value, or `stand_in` where it was not given (then the model decides later)."""
    return stand_in if value is None else value


def run_generate(args: argparse.Namespace) -> int:
    # Everything that needs no model is checked first: a bad request costs no loading time and writes nothing.
    check_output(args.output)
    if args.init_image is not None and not os.path.isfile(args.init_image):
        raise ValueError(f"init image {args.init_image} does not exist")
    check_generation_args(
        height=given(args.height, 512), width=given(args.width, 512), steps=given(args.steps, 1),
        sampler=given(args.sampler, "euler"), strength=args.strength if args.init_image else None,
        batch=args.batch, prompts=[args.prompt], eta=args.eta if args.sampler else None,  # else: once it is known
    )  # fmt: skip

    import torch
    from PIL import Image
    from tqdm import tqdm

    from diffrt.pipeline import Pipeline, default_steps

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    model = args.model or DEFAULT_MODEL
    if args.model is None:
        note_prompt_outside_the_grammar(args.prompt)
    pipe = Pipeline.from_pretrained(model, device=device, dtype=dtype, variant=args.variant,
                                    allow_pickle=args.allow_pickle, tokenizer=args.tokenizer,
                                    prediction_type=args.prediction_type, backend=args.backend)  # fmt: skip
    if pipe.components.is_random:
        print(
            f"note: {model!r} is a preset with random weights: its picture is noise, not your prompt", file=sys.stderr
        )
    init = Image.open(args.init_image) if args.init_image else None
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31, ()))
    sampler = args.sampler or pipe.default_sampler()
    steps = given(args.steps, default_steps(sampler))
    run_steps = int(steps * args.strength) if init is not None else steps
    with tqdm(total=run_steps, desc=f"{sampler} steps", unit="step", file=sys.stderr) as bar:
        images = pipe(
            args.prompt, args.negative_prompt, height=args.height, width=args.width, steps=steps, sampler=sampler,
            guidance_scale=args.cfg, seed=seed, batch=args.batch, image=init, strength=args.strength,
            clip_skip=args.clip_skip, callback=lambda *_: bar.update(), eta=args.eta,
        )  # fmt: skip
    paths = output_paths(args.output, len(images))
    for image, path in zip(images, paths):
        save_atomically(image, path)
    print(f"wrote {', '.join(paths)} ({images[0].width}x{images[0].height}, {sampler}, {steps} steps, seed {seed})")
    return 0


def note_prompt_outside_the_grammar(prompt: str) -> None:
    """The embedded model only knows the shapes grammar it was trained on: say so rather than surprise."""
    from diffrt.train.shapes import parse_caption

    try:
        parse_caption(prompt)
    except ValueError as e:
        print(
            f"note: the embedded default model draws captions of its shapes grammar only ({e}); e.g. "
            '"a large red circle on the left, blue background" or "a green square above a yellow star, black '
            'background". Pass --model for other prompts.',
            file=sys.stderr,
        )


def run_samplers(args: argparse.Namespace) -> int:
    from diffrt.samplers import SAMPLERS

    for name, fn in SAMPLERS.items():
        print(f"{name:16s} {(fn.__doc__ or '').strip().splitlines()[0]}")
    return 0
