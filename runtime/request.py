"""One generation request, as the CLI, the Python API and the server all make it, and the checks it must pass.

`resolve_request` fills what was left unset from the model (sampler, steps, guidance, size) and checks everything in
one place, before any work: a bad request gets one ValueError that names each mistake once, with what is allowed.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from diffrt.memory import available_bytes, gib
from diffrt.model_spec import ModelSpec
from diffrt.models.text_conditioning import check_clip_skip
from diffrt.sampler_registry import ETA_SAMPLERS, SAMPLERS
from diffrt.samplers import check_eta
from diffrt.schedules import check_strength
from diffrt.tiled_decode import MIN_TILE

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. None means "the model's default", filled in by `resolve_request`."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    height: int | None = None  # pixels; default: the init image's, else the model's
    width: int | None = None
    steps: int | None = None  # default: the sampler's (4 for lcm/tcd, 1 for turbo, 25 otherwise)
    sampler: str | None = None  # default: what the model's scheduler config implies
    guidance_scale: float | None = None  # 0 or 1: no unconditional pass; default: the sampler's and the model's
    eta: float | None = None  # ddim / tcd only: the stochastic share (tcd: gamma); default: the sampler's
    seed: int | None = None  # None: a random seed, reported in the result
    batch: int = 1  # images per prompt
    image: Image.Image | torch.Tensor | None = None  # img2img: a PIL image or [B, 3, H, W] in [0, 1]
    strength: float = 0.8  # img2img: how much of the schedule runs, (0, 1]
    latents: torch.Tensor | None = None  # txt2img: the initial noise [B, C, H/8, W/8], as diffusers takes it
    clip_skip: int | None = None
    original_size: tuple[int, int] | None = None  # SDXL micro-conditioning (height, width); default: the output size
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    output_type: str = "pil"  # "pil" (list of images), "np" (float [B, H, W, 3] in [0, 1]), "pt" ([B, 3, H, W])
    check_memory: bool = True  # refuse a request whose estimated memory exceeds what the device has free
    # Decode in tiles of at most this many pixels a side, image by image (diffrt.tiled_decode). None: only where the
    # whole decode would not fit in free memory (resolved to the tile chosen, else left None); 0: always whole.
    vae_tile: int | None = None
    # ControlNet (one entry per ControlNet of the pipeline; a single value applies to all): the control image (PIL, or
    # [B, C, H, W] in [0, 1]; resized to the output, which defaults to its size), the residuals' scale, and the share
    # of the schedule [start, end] it guides. Resolved to tuples of one entry per ControlNet.
    control_image: object = None
    controlnet_conditioning_scale: float | Sequence[float] = 1.0
    control_guidance_start: float | Sequence[float] = 0.0
    control_guidance_end: float | Sequence[float] = 1.0

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def images_out(self) -> int:
        return len(self.prompts) * self.batch


@dataclass
class GenerationResult:
    images: object  # in the request's output_type
    latents: torch.Tensor  # the final latents [B, C, h, w], before decoding
    seed: int | None  # the seed the noise was drawn with (None when the caller passed a generator)


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height) of a PIL image or an image tensor."""
    if isinstance(image, Image.Image):
        return image.size
    return image.shape[-1], image.shape[-2]


def resolve_request(
    request: GenerationRequest,
    spec: ModelSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
    weights_resident: bool,
    known_to_fit: dict | None = None,
    memory_budget: int | None = None,
) -> GenerationRequest:
    """The request with every default filled in; ValueError naming each mistake once if it cannot run.

    weights_resident: the model is already on `device` (its weights are no longer part of what must fit).
    known_to_fit: {memory_key: the vae_tile it resolved to} of requests that already ran here; they skip the
    estimate (and its device query).
    memory_budget: bytes to check the estimate against instead of what the device has free right now (a server
    measures that once, idle, since while a generation runs the free memory says nothing about the next one).
    """
    problems: list[str] = []

    def check(fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except ValueError as e:
            problems.append(str(e))
            return False

    prompts_ok = check(_check_prompts, request)
    check(_check_positive_int, "batch", request.batch)
    sampler = request.sampler or spec.default_sampler
    sampler_ok = check(_check_sampler, sampler)
    steps = request.steps
    if sampler_ok and steps is None:
        steps = SAMPLERS[sampler].default_steps
    # Unset steps with an unknown sampler has no default: the sampler's message says it all.
    steps_ok = (steps is not None or sampler_ok) and check(_check_positive_int, "steps", steps)
    if sampler_ok and steps_ok:
        steps_ok = check(SAMPLERS[sampler].schedule, spec.scheduler, steps)  # the scheduler's own step limits
    guidance = request.guidance_scale
    if guidance is None and sampler_ok:
        guidance = SAMPLERS[sampler].default_guidance(
            sdxl=spec.sdxl, guidance_embedding=spec.guidance_embedding_dim is not None
        )
    check(_check_guidance, guidance)
    if request.eta is not None and sampler_ok:
        if sampler not in ETA_SAMPLERS:
            eta_samplers = " and ".join(sorted(ETA_SAMPLERS))
            problems.append(f"eta applies to the {eta_samplers} samplers only, not {sampler!r}")
        else:
            check(check_eta, request.eta)
    control = _resolve_control(request, spec, problems)
    w, h = spec.default_size, spec.default_size
    if control and control["control_image"]:
        w, h = image_size(control["control_image"][0])
    if request.image is not None and check(_check_image, request.image):
        w, h = image_size(request.image)
    height = h if request.height is None else request.height
    width = w if request.width is None else request.width
    size_ok = check(_check_side, "height", height, spec.vae_scale) & check(_check_side, "width", width, spec.vae_scale)
    if request.image is not None and steps_ok:
        check(check_strength, request.strength, steps)
    check(check_clip_skip, request.clip_skip, spec.deepest_clip_skip)
    check(_check_micro_conditioning, request, spec)
    if request.output_type not in OUTPUT_TYPES:
        problems.append(f"output_type {request.output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}")
    if request.vae_tile is not None:
        check(_check_vae_tile, request.vae_tile, spec.vae_scale)
    if request.seed is not None and not (isinstance(request.seed, int) and 0 <= request.seed < 2**63):
        problems.append(f"seed {request.seed!r} must be an integer in [0, 2**63)")
    resolved = replace(request, sampler=sampler, steps=steps, guidance_scale=guidance, height=height, width=width,
                       **(control or {}))  # fmt: skip
    if size_ok and prompts_ok and not problems:
        check(_check_shapes, resolved, spec)
    key = memory_key(resolved, spec, request.vae_tile) if not problems else None
    if key is not None and request.check_memory:
        if key in (known_to_fit or {}):
            resolved = replace(resolved, vae_tile=known_to_fit[key])
        else:
            try:
                tile = _fit_memory(resolved, spec, device, dtype, weights_resident, memory_budget)
                resolved = replace(resolved, vae_tile=tile)
            except ValueError as e:
                problems.append(str(e))
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems with this request:\n" + "\n".join(f"  - {p}" for p in problems))
    return resolved


def memory_key(request: GenerationRequest, spec: ModelSpec, asked_tile: int | None) -> tuple:
    """What the memory a resolved request needs depends on, with the vae_tile its caller asked for (resolving may
    choose one where none was asked)."""
    return (request.images_out, request.height, request.width, uses_cfg(request, spec), asked_tile)


def uses_cfg(request: GenerationRequest, spec: ModelSpec) -> bool:
    """Classifier-free guidance runs an unconditional batch: guidance above 1, unless an LCM UNet embeds it."""
    return request.guidance_scale > 1.0 and spec.guidance_embedding_dim is None


def _resolve_control(request: GenerationRequest, spec: ModelSpec, problems: list[str]) -> dict | None:
    """The ControlNet fields as tuples of one entry per ControlNet, or None when there are none (problems noted)."""
    n, given = spec.controlnets, request.control_image
    if n == 0:
        if given is not None:
            problems.append("control_image was given but this pipeline has no ControlNet; add one with "
                            "pipe.load_controlnet(PATH) (CLI: --controlnet PATH)")  # fmt: skip
        return None
    if given is None:
        problems.append(f"this pipeline has {n} ControlNet(s): give control_image (one image per ControlNet)")
        return None
    images = tuple(given) if isinstance(given, (list, tuple)) else (given,)
    out = {"control_image": images}
    if len(images) != n:
        problems.append(f"{len(images)} control images for {n} ControlNet(s); give one per ControlNet")
        out["control_image"] = ()
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image) and not (torch.is_tensor(image) and image.ndim in (3, 4)):
            problems.append(f"control image {i} must be a PIL image or a tensor [B, C, H, W] in [0, 1]")
            out["control_image"] = ()
    for name in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
        value = getattr(request, name)
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
        if len(values) != n or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            problems.append(f"{name} {value!r} must be a finite number or a list of {n} (one per ControlNet)")
            values = (0.0,) * n
        out[name] = tuple(float(v) for v in values)
    for i, (start, end) in enumerate(zip(out["control_guidance_start"], out["control_guidance_end"], strict=True)):
        if not 0.0 <= start < end <= 1.0:
            problems.append(f"ControlNet {i}: control guidance start {start} and end {end} must satisfy "
                            "0 <= start < end <= 1")  # fmt: skip
    return out


def _check_prompts(request: GenerationRequest) -> None:
    if not isinstance(request.prompt, (str, list, tuple)):  # before .prompts, which would iterate it
        raise ValueError(f"prompt must be a string or a non-empty list of strings, not {type(request.prompt).__name__}")
    prompts = request.prompts
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    negative = request.negative_prompt
    if isinstance(negative, list) and len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt")
    if negative is not None and not isinstance(negative, (str, list)):
        raise ValueError(f"negative_prompt must be a string or a list of strings, not {type(negative).__name__}")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} {value!r} must be an integer >= 1")


def _check_sampler(name) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def _check_guidance(scale) -> None:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale {scale!r} must be a finite number >= 0 (0 or 1: no guidance)")


def nearest_multiples(value: int, multiple: int) -> str:
    below = max(multiple, value // multiple * multiple)
    above = below + multiple if below < value else below
    return f"{below}" if below == above else f"{below} or {above}"


def _check_side(name: str, value, multiple: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < multiple:
        raise ValueError(f"{name} {value!r} must be a positive integer multiple of {multiple}")
    if value % multiple:
        raise ValueError(f"{name} {value} is not a multiple of {multiple}; try {nearest_multiples(value, multiple)}")


def _check_image(image) -> None:
    if isinstance(image, Image.Image):
        return
    if not torch.is_tensor(image) or image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError("init image must be a PIL image or a tensor [B, 3, H, W] (or [3, H, W]) in [0, 1]")


def _check_micro_conditioning(request: GenerationRequest, spec: ModelSpec) -> None:
    given = [n for n in ("original_size", "target_size") if getattr(request, n) is not None]
    if request.crops_coords_top_left != (0, 0):
        given.append("crops_coords_top_left")
    if given and not spec.sdxl:
        raise ValueError(f"{', '.join(given)}: micro-conditioning applies to SDXL models only")
    for name in ("original_size", "target_size", "crops_coords_top_left"):
        value = getattr(request, name)
        if value is not None and not (len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value)):
            raise ValueError(f"{name} {value!r} must be a pair of integers >= 0, (height, width) or (top, left)")


def _check_shapes(request: GenerationRequest, spec: ModelSpec) -> None:
    n = request.images_out
    if request.image is not None and torch.is_tensor(request.image):
        image = request.image if request.image.ndim == 4 else request.image[None]
        if tuple(image.shape[-2:]) != (request.height, request.width):
            raise ValueError(
                f"init image tensor is {tuple(image.shape[-2:])} (H, W) but the output is "
                f"{(request.height, request.width)}; resize it or give a PIL image (resized for you)"
            )
        if image.shape[0] not in (1, n):
            raise ValueError(f"{image.shape[0]} init images for {n} outputs; give one image or one per output")
    for i, image in enumerate(request.control_image if spec.controlnets else ()):
        if torch.is_tensor(image):
            image = image if image.ndim == 4 else image[None]
            if tuple(image.shape[-2:]) != (request.height, request.width):
                raise ValueError(
                    f"control image {i} is a tensor of {tuple(image.shape[-2:])} (H, W) but the output is "
                    f"{(request.height, request.width)}; resize it or give a PIL image (resized for you)"
                )
            if image.shape[0] not in (1, len(request.prompts)):
                raise ValueError(
                    f"control image {i} holds {image.shape[0]} images for {len(request.prompts)} prompt(s); give one, "
                    "or one per prompt"
                )
    if request.latents is not None:
        shape = (n, spec.latent_channels, request.height // spec.vae_scale, request.width // spec.vae_scale)
        if tuple(request.latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(request.latents.shape)}; this call needs {shape}")


def _check_vae_tile(tile, scale: int) -> None:
    if not isinstance(tile, int) or isinstance(tile, bool) or (tile != 0 and (tile < MIN_TILE or tile % scale)):
        raise ValueError(f"vae_tile {tile!r} must be 0 (decode whole) or a multiple of {scale} pixels >= {MIN_TILE}")


def _fit_memory(
    request: GenerationRequest,
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    weights_resident: bool,
    budget: int | None = None,
) -> int | None:
    """The request's decode tile (None: whole) that lets it fit in what `device` has free: the caller's, or where
    it asked for none, whole if that fits, else image by image, else the largest tile that fits. ValueError with the
    largest size of the same aspect ratio that would fit when nothing does. budget: bytes to fit in instead of
    what the device has free now."""
    available = available_bytes(device) if budget is None else budget
    h, w = request.height, request.width
    if request.vae_tile is not None:
        candidates = [request.vae_tile or None]
    else:  # whole, image by image (a tile as large as the image), then ever smaller tiles
        side = max(h, w, MIN_TILE)
        candidates = [None, side, *(t for t in (2048, 1536, 1024, 768, 512, MIN_TILE) if t < side)]
    if available is None:
        return candidates[0]
    m, n, scale, cfg = spec.memory, request.images_out, spec.vae_scale, uses_cfg(request, spec)
    weights = 0 if weights_resident else m.weight_bytes(dtype)

    def needed(h: int, w: int, tile: int | None) -> int:
        decoder = m.decoder_bytes(n, h, w, scale, dtype) if tile is None else m.decoder_bytes(
            1, min(h, tile), min(w, tile), scale, dtype)  # fmt: skip
        return weights + max(m.unet_bytes(n, h, w, scale, dtype, cfg), decoder)

    for tile in candidates:
        if needed(h, w, tile) <= available:
            return tile
    # The largest size of the same aspect ratio that fits (activations grow with the pixel count).
    smallest = candidates[-1]
    fit, lo, hi = None, 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        mh, mw = (max(spec.vae_scale, int(s * mid) // spec.vae_scale * spec.vae_scale) for s in (h, w))
        if needed(mh, mw, smallest) <= available:
            lo, fit = mid, (mw, mh)
        else:
            hi = mid
    ratio = math.gcd(w, h)
    advice = f"the largest {w // ratio}:{h // ratio} size that fits is {fit[0]}x{fit[1]}" if fit else "no size fits"
    raise ValueError(
        f"{w}x{h} x {request.images_out} image(s) needs about {gib(needed(h, w, smallest))} on {device} "
        f"(estimated) but {gib(available)} is free; {advice} (or pass check_memory=False / --no-memory-check to try "
        "anyway)"
    )
