"""The host plan of one generation and its device run.

`make_plan` does the host's part once (schedule, conditioning, noise, the static shapes a CUDA graph needs fixed);
`run_plan` is the device's part: the sampler loop over the denoiser, then the decode, with no host sync. A backend
runs a plan however it likes (eagerly, replayed from a CUDA graph); the result must be the same.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffrt.control import ControlPlan, make_control_plan, step_denoisers
from diffrt.images import image_to_tensor
from diffrt.model_spec import ModelSpec
from diffrt.models.embeddings import guidance_scale_embedding
from diffrt.request import GenerationRequest, uses_cfg
from diffrt.roles import Conditioning, Denoiser, ImageCodec, Roles, prepared
from diffrt.sampler_registry import SAMPLERS, Sampler
from diffrt.samplers import Callback, NoiseSource, X0Predictor, add_noise, initial_latents
from diffrt.schedules import Schedule, truncate_for_strength
from diffrt.tiled_decode import decode_in_parts

PromptEmbeddings = Callable[[list[str], int | None], tuple[Tensor, Tensor | None]]  # (prompts, clip_skip) -> cached


@dataclass
class GenerationPlan:
    request: GenerationRequest  # resolved: no field is left to a default
    sampler: Sampler
    schedule: Schedule  # truncated for img2img
    prediction_type: str
    cond: Conditioning  # on the device; batch = the latents' (twice that under CFG: unconditional first)
    guidance_scale: float | None  # None: no unconditional batch (guidance 0/1, or embedded by an LCM UNet)
    latents: Tensor  # the starting state of the sampler loop
    noise: NoiseSource  # the loop's fresh noise, drawn in diffusers' order after the starting state's
    seed: int | None
    options: dict = field(default_factory=dict)  # the sampler's keyword options (eta)
    control: ControlPlan | None = None  # ControlNet guidance: images and per-step scales (diffrt.control)

    @property
    def bucket(self) -> tuple:
        """What fixes a CUDA graph of this plan: shapes, schedule, whether there is an unconditional batch, and
        which ControlNets run at which step."""
        return (tuple(self.latents.shape), self.sampler.name, self.schedule, self.guidance_scale is not None,
                tuple(sorted(self.options.items())), self.control.bucket if self.control else None,
                self.request.vae_tile or None)  # fmt: skip

    def decode(self, codec: ImageCodec, latents: Tensor) -> Tensor:
        """The plan's decode: whole, or in the parts its resolved request asks for (diffrt.tiled_decode)."""
        scale = self.request.height // latents.shape[-2]
        return decode_in_parts(codec.decode, latents, self.request.vae_tile or None, scale)


def make_plan(
    request: GenerationRequest,
    spec: ModelSpec,
    prompt_embeddings: PromptEmbeddings,
    codec: ImageCodec,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> GenerationPlan:
    """The host's part of a resolved request: schedule, conditioning, seed and starting latents."""
    r = request
    sampler = SAMPLERS[r.sampler]
    schedule = sampler.schedule(spec.scheduler, r.steps)
    if r.image is not None:
        schedule = truncate_for_strength(schedule, r.strength)
    cfg = uses_cfg(r, spec)
    cond = _conditioning(r, spec, prompt_embeddings, cfg, device, dtype)

    seed = r.seed
    if generator is None:
        seed = random.getrandbits(31) if seed is None else seed  # host-only: no torch op before the device work
        generator = torch.Generator(device).manual_seed(seed)
    else:
        seed = None  # a caller's generator: its seed (and state) are the caller's
    noise = NoiseSource(generator)
    n = r.images_out
    shape = (n, spec.latent_channels, r.height // spec.vae_scale, r.width // spec.vae_scale)
    if r.image is not None:  # img2img: the image's latents (posterior sample first), noised to the first step
        pixels = image_to_tensor(r.image, r.height, r.width).to(device)
        pixels = pixels.expand(n, -1, -1, -1) if pixels.shape[0] == 1 else pixels
        latents = add_noise(codec.encode(pixels, noise), noise(shape, dtype, device), schedule)
    else:
        start = r.latents.to(device, dtype) if r.latents is not None else noise(shape, dtype, device)
        latents = initial_latents(start, schedule)
    control = None
    if spec.controlnets:
        control = make_control_plan(
            r.control_image, r.controlnet_conditioning_scale, r.control_guidance_start, r.control_guidance_end,
            steps=len(schedule.timesteps), per_prompt=r.batch, total=n, cfg=cfg, height=r.height, width=r.width,
            device=device, dtype=dtype,
        )  # fmt: skip
    return GenerationPlan(
        request=r,
        sampler=sampler,
        schedule=schedule,
        prediction_type=spec.scheduler.prediction_type,
        cond=cond,
        guidance_scale=r.guidance_scale if cfg else None,
        latents=latents,
        noise=noise,
        seed=seed,
        options={} if r.eta is None else {"eta": r.eta},
        control=control,
    )


def run_plan(plan: GenerationPlan, roles: Roles, callback: Callback | None = None) -> tuple[Tensor, Tensor]:
    """The device's part, eagerly: the sampler loop, then the decode. Returns (images [B, 3, H, W] in [0, 1],
    final latents)."""
    outputs = model_outputs(roles, plan.cond, plan.guidance_scale, plan.control)
    model = X0Predictor(outputs, plan.prediction_type, plan.schedule, plan.latents.device)
    latents = plan.sampler.sample(model, plan.latents, plan.schedule, plan.noise, callback, **plan.options)
    return plan.decode(roles.codec, latents), latents


def model_outputs(
    roles: Roles, cond: Conditioning, guidance_scale: float | Tensor | None, control: ControlPlan | None
) -> Callable[[Tensor, Tensor], Tensor] | list[Callable[[Tensor, Tensor], Tensor]]:
    """What the sampler calls for the model output: the guided denoiser, or with ControlNets one guided controlled
    denoiser per step (which ControlNets run at a step is the host's decision); the conditioning prepared for the
    denoiser here, once for the loop (device work: a caller that captures the loop calls this inside the capture)."""
    cond = prepared(roles.denoiser, cond)
    if control is None:
        return guided(roles.denoiser, cond, guidance_scale)
    return [guided(d, cond, guidance_scale) for d in step_denoisers(roles.denoiser, roles.controlnets, control)]


def guided(
    denoiser: Denoiser, cond: Conditioning, guidance_scale: float | Tensor | None
) -> Callable[[Tensor, Tensor], Tensor]:
    """The model output the sampler sees: the denoiser's, or classifier-free guidance over one doubled batch
    (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    if guidance_scale is None:
        return lambda x, t: denoiser(x, t, cond)

    def cfg_output(x: Tensor, t: Tensor) -> Tensor:
        uncond, conditional = denoiser(torch.cat([x, x]), t, cond).chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    return cfg_output


def _conditioning(
    r: GenerationRequest,
    spec: ModelSpec,
    prompt_embeddings: PromptEmbeddings,
    cfg: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Conditioning:
    """Text embeddings (cached per prompt) repeated per image, the unconditional half under CFG, SDXL's added
    inputs and LCM's guidance embedding, as diffusers' pipelines build them."""
    prompts, n = r.prompts, r.images_out
    embeds, pooled = prompt_embeddings(prompts, r.clip_skip)
    embeds, pooled = _repeat(embeds, r.batch), _repeat(pooled, r.batch)
    if cfg:
        if r.negative_prompt is None and spec.sdxl and spec.force_zeros_for_empty_prompt:
            neg, neg_pooled = torch.zeros_like(embeds), (torch.zeros_like(pooled) if pooled is not None else None)
        else:  # the negative prompt (or "") is encoded without clip_skip, as diffusers does
            negatives = r.negative_prompt
            if not isinstance(negatives, list):
                negatives = [negatives or ""] * len(prompts)
            neg, neg_pooled = (_repeat(t, r.batch) for t in prompt_embeddings(negatives, None))
        embeds = torch.cat([neg, embeds])
        pooled = torch.cat([neg_pooled, pooled]) if pooled is not None else None
    fields = {"embeds": embeds.to(dtype)}
    if spec.sdxl:
        size = (r.height, r.width)
        ids = [*(r.original_size or size), *r.crops_coords_top_left, *(r.target_size or size)]
        time_ids = to_device_no_sync(torch.tensor([ids], dtype=dtype), device)
        fields["time_ids"] = time_ids.repeat(embeds.shape[0], 1)
        fields["text_embeds"] = pooled.to(dtype)
    if spec.guidance_embedding_dim is not None:  # LCM: w - 1 embedded (Luo et al. 2023, Sec. 4.3), no CFG batch
        w = guidance_scale_embedding(torch.full((n,), r.guidance_scale - 1), spec.guidance_embedding_dim)
        fields["timestep_cond"] = to_device_no_sync(w.to(dtype), device)
    return Conditioning(**fields)


def to_device_no_sync(t: Tensor, device: torch.device) -> Tensor:
    """Host data to `device`; to a GPU through pinned memory, so the copy waits for no earlier GPU work."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _repeat(t: Tensor | None, batch: int) -> Tensor | None:
    """[P, ...] -> [P * batch, ...], each prompt's copies together (diffusers' num_images_per_prompt order), as an
    expand and a copy: no output-size computation on the device to wait for."""
    if t is None or batch == 1:
        return t
    return t.unsqueeze(1).expand(t.shape[0], batch, *t.shape[1:]).reshape(t.shape[0] * batch, *t.shape[1:])
