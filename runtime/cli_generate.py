"""`diffrt generate` (text-to-image and image-to-image to a file) and `diffrt samplers` (what exists).

Flags follow diffusers' argument names and stable-diffusion.cpp's short options. Every check that needs no model
runs before the model is loaded, and the image is written atomically, so a failed run leaves no file behind.
"""

import argparse
import os
import sys
import tempfile
from dataclasses import replace

from diffrt.backends import BACKENDS

# The embedded model (diffrt.train, issue 5): a 64x64 LCM-distilled SD-family model of procedural shapes, 23 MB.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
# The embedded model's ControlNet (diffrt.train.controlnet): a control image fixes where and how big the shapes are.
DEFAULT_CONTROLNET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_controlnet")
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
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="default: cuda-graph on a GPU (generations replayed from CUDA graphs), else torch")  # fmt: skip
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the estimated memory exceeds what the device has free")  # fmt: skip
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse a LoRA (diffusers or kohya layout) at SCALE (default 1); repeat for several")  # fmt: skip
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="add a ControlNet (folder or single file); repeat for several, each with a --control-image",
    )
    p.add_argument(
        "--control-image",
        action="append",
        default=[],
        metavar="IMG",
        help="control image per ControlNet (alone, with the embedded model: its shapes ControlNet)",
    )
    p.add_argument(
        "--control-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="ControlNet conditioning scale (default 1); one, or one per ControlNet",
    )
    p.add_argument("--control-start", type=float, default=0.0, help="share of the steps before ControlNets guide")
    p.add_argument("--control-end", type=float, default=1.0, help="share of the steps after which they stop")
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


def open_init_image(path: str | None, what: str = "init image"):
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path} is not an image PIL can read ({e})") from e


def parse_lora(spec: str) -> tuple[str, float]:
    """PATH[:SCALE] -> (path, scale); a suffix that is not a number belongs to the path."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def control_setup(args: argparse.Namespace) -> tuple[list[str], list]:
    """(ControlNet paths, control images) of the flags; the embedded ControlNet when only images are given with the
    embedded model. ValueError naming a mismatch."""
    controlnets = list(args.controlnet)
    if args.control_image and not controlnets:
        if args.model is not None:
            raise ValueError("--control-image needs --controlnet PATH for a --model other than the embedded one")
        if not os.path.isdir(DEFAULT_CONTROLNET):
            raise ValueError(
                f"the embedded ControlNet is not shipped in this build ({DEFAULT_CONTROLNET} is missing); pass "
                "--controlnet PATH"
            )
        controlnets = [DEFAULT_CONTROLNET]
    if len(args.control_image) != len(controlnets):
        raise ValueError(f"{len(args.control_image)} --control-image for {len(controlnets)} --controlnet; one each")
    images = [open_init_image(path, "control image") for path in args.control_image]
    return controlnets, images


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from diffrt.assembly import open_model
    from diffrt.backends import default_backend, make_backend
    from diffrt.request import GenerationRequest, resolve_request

    # 1. What needs no model: the output path and the init image.
    check_output(args.output)
    init = open_init_image(args.init_image)
    controlnets, control_images = control_setup(args)
    loras = [parse_lora(spec) for spec in args.lora]
    for path, _ in loras:
        if not os.path.exists(path):
            raise ValueError(f"LoRA {path} does not exist")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = make_backend(args.backend or default_backend(device))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    # 2. Describe the model (configs and tokenizers; no weights are read) and check the whole request against it.
    model = args.model or DEFAULT_MODEL
    exported = exported_model(model, args.backend)
    if exported is not None and args.backend is None:  # an export folder runs on ONNX Runtime unless told otherwise
        backend = make_backend("onnxruntime")
    if exported is not None and (controlnets or loras):
        raise ValueError("--controlnet and --lora need the model's torch modules; an export folder runs its files")
    source = exported or open_model(model, variant=args.variant, allow_pickle=args.allow_pickle,
                                    tokenizer=args.tokenizer, prediction_type=args.prediction_type)  # fmt: skip
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        steps=args.steps, sampler=args.sampler, guidance_scale=args.cfg, eta=args.eta, seed=args.seed,
        batch=args.batch, image=init, strength=args.strength, clip_skip=args.clip_skip,
        check_memory=not args.no_memory_check, control_image=control_images or None,
        controlnet_conditioning_scale=args.control_scale if len(args.control_scale) > 1 else
        (args.control_scale or [1.0])[0], control_guidance_start=args.control_start,
        control_guidance_end=args.control_end,
    )  # fmt: skip
    spec = replace(source.spec, controlnets=len(controlnets))
    request = resolve_request(request, spec, device=device, dtype=dtype, weights_resident=False)
    if args.model is None:
        note_prompt_outside_the_grammar(args.prompt)
    if source.spec.is_random:
        print(
            f"note: {model!r} is a preset with random weights: its picture is noise, not your prompt", file=sys.stderr
        )

    # 3. Load, generate, write.
    from tqdm import tqdm

    from diffrt.pipeline import Pipeline

    if exported is None:
        pipe = Pipeline.from_components(source.components(device), device=device, dtype=dtype, backend=backend)
    else:  # an export folder: its backend runs the files (checked first), no torch modules are built
        pipe = Pipeline.from_export(exported.folder, device=device, dtype=dtype if args.dtype else None,
                                    backend=backend)  # fmt: skip
    for path in controlnets:
        pipe.load_controlnet(path, allow_pickle=args.allow_pickle)
    for path, scale in loras:
        pipe.load_lora(path, scale=scale, allow_pickle=args.allow_pickle)
    run_steps = int(request.steps * request.strength) if init is not None else request.steps
    with tqdm(total=run_steps, desc=f"{request.sampler} steps", unit="step", file=sys.stderr) as bar:
        result = pipe.generate(request, callback=lambda *_: bar.update())
    paths = output_paths(args.output, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        save_atomically(image, path)
    size = f"{result.images[0].width}x{result.images[0].height}"
    print(f"wrote {', '.join(paths)} ({size}, {request.sampler}, {request.steps} steps, seed {result.seed})")
    return 0


def exported_model(model: str, backend: str | None):
    """A `diffrt export` folder described from its manifest (None if `model` is not one); it runs on the
    onnxruntime (the default for it) or tensorrt backend only."""
    from diffrt.export.manifest import is_export_folder

    if not (os.path.isdir(model) and is_export_folder(model)):
        return None
    if backend not in (None, "onnxruntime", "tensorrt"):
        raise ValueError(f"{model} is an ONNX export folder: run it with --backend onnxruntime or tensorrt")
    from diffrt.export.exported import describe_export

    return describe_export(model)


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
    from diffrt.sampler_registry import SAMPLERS

    for name, sampler in SAMPLERS.items():
        print(f"{name:16s} {sampler.summary}")
    return 0
