"""Text-to-image and image-to-image: prompt -> text conditioning -> sampler loop over the UNet -> VAE decode.

The pipeline is backend-agnostic: it calls the three components as modules and leaves how they run to them. It
follows diffusers' StableDiffusion(XL)Pipeline step for step (tests/test_pipeline.py holds it to that), so the same
weights, latents and seed give the same image.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffrt.models.text_conditioning import PromptEncoder
from diffrt.samplers import (
    SAMPLERS,
    Denoiser,
    SchedulerConfig,
    add_noise,
    initial_latents,
    make_schedule,
    truncate_for_strength,
)
from diffrt.validation import check_generation_args

# The sampler a scheduler class implies when no sampler is named; anything else samples with Euler.
_SAMPLER_FOR_CLASS = {
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
FEW_STEP_SAMPLERS = ("lcm", "tcd", "turbo")  # distilled models: a few steps, no classifier-free guidance


def default_steps(sampler: str) -> int:
    return {"lcm": 4, "tcd": 4, "turbo": 1}.get(sampler, 25)


def default_guidance(sampler: str, *, sdxl: bool, guidance_embedding: bool) -> float:
    """diffusers' pipeline defaults: 8.5 embedded by an LCM UNet (LatentConsistencyModelPipeline), no guidance for
    the other few-step samplers, 7.5 for SD (5 for SDXL)."""
    if guidance_embedding:
        return 8.5
    if sampler in FEW_STEP_SAMPLERS:
        return 1.0
    return 5.0 if sdxl else 7.5


@dataclass
class Components:
    """The modules and files one pipeline runs; text_encoder is None for an SDXL refiner-style checkpoint."""

    unet: torch.nn.Module
    vae: torch.nn.Module  # AutoencoderKL or AutoencoderTiny
    tokenizer: object | None
    text_encoder: torch.nn.Module | None
    scheduler_config: dict
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL base: zeros, not the encoded "", as the unconditional input
    is_random: bool = False  # random weights: the picture is noise


class Pipeline:
    """A loaded diffusion model ready to generate. Build it with `Pipeline.from_pretrained`."""

    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype, prompt_cache_size: int = 32):
        self.components = components
        self.device, self.dtype = device, dtype
        self.scheduler_config = SchedulerConfig.from_diffusers(components.scheduler_config)
        self.sdxl = components.text_encoder_2 is not None
        self.vae_scale = components.vae.config.vae_scale_factor  # pixels per latent: 8 for the SD family and TAESD
        self._prompt_cache: OrderedDict = OrderedDict()
        self._prompt_cache_size = prompt_cache_size

    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
        allow_pickle: bool = False,
        tokenizer: str | None = None,
        prediction_type: str | None = None,
        backend: str = "torch",
        seed: int = 0,
    ) -> "Pipeline":
        """From a diffusers pipeline folder, a single-file checkpoint (with `tokenizer=` folder(s), since such a
        file carries none), or a preset name (`diffrt.presets.PRESETS`: real architectures, random weights).
        prediction_type overrides the scheduler config's ("epsilon" / "v_prediction"): an SD2 single file does not
        say which it was trained for (v is assumed, as diffusers does; SD2-base and SD-Turbo need "epsilon").
        backend: "torch" or "triton" (diffrt.backends; the switch is process-wide, as the kernels are shared)."""
        from diffrt.assembly import components_from_path, components_from_preset
        from diffrt.backends import use_backend
        from diffrt.presets import PRESETS

        use_backend(backend)  # first: an unknown backend fails before any loading
        if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
            comps = components_from_preset(path_or_preset, seed=seed)
        else:
            comps = components_from_path(
                path_or_preset, variant=variant, allow_pickle=allow_pickle, tokenizer=tokenizer
            )
        if prediction_type is not None:
            comps.scheduler_config = {**comps.scheduler_config, "prediction_type": prediction_type}
        device = torch.device(device)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(comps, name)
            if module is not None:
                module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        sdxl = comps.text_encoder_2 is not None
        if sdxl and dtype == torch.float16 and getattr(comps.vae.config, "force_upcast", False):
            comps.vae.float()  # the SDXL VAE overflows in fp16: upcast as diffusers' SDXL pipelines do
        return cls(comps, device, dtype)

    # ---- text conditioning ---------------------------------------------------------------------------------------

    def encode_prompt(
        self, prompts: list[str], clip_skip: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds [B, 77, C], pooled or None), cached per (prompts, clip_skip): a repeated prompt costs no
        text-encoder pass."""
        key = (tuple(prompts), clip_skip)
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        c = self.components
        ids = c.tokenizer(prompts).to(self.device) if c.text_encoder is not None else None
        ids_2 = c.tokenizer_2(prompts).to(self.device) if c.text_encoder_2 is not None else None
        with torch.inference_mode():
            embeds = PromptEncoder(c.text_encoder, c.text_encoder_2, clip_skip)(ids, ids_2)
        self._prompt_cache[key] = embeds
        if len(self._prompt_cache) > self._prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return embeds

    # ---- generation ----------------------------------------------------------------------------------------------

    def default_sampler(self) -> str:
        return _SAMPLER_FOR_CLASS.get(self.components.scheduler_config.get("_class_name", ""), "euler")

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch: int = 1,
        image: Image.Image | torch.Tensor | None = None,
        strength: float = 0.8,
        latents: torch.Tensor | None = None,
        clip_skip: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        output_type: str = "pil",
        return_latents: bool = False,
        callback=None,
        eta: float | None = None,
    ):
        """Generate `batch` images per prompt.

        sampler: a name in `diffrt.samplers.SAMPLERS` (default: what the model's scheduler config implies).
        steps: default 4 for lcm/tcd, 1 for turbo, 25 otherwise. guidance_scale: default 1 (no CFG) for those
        few-step samplers, 7.5 otherwise (5 for SDXL); 0 or 1 skips the unconditional pass. seed or generator:
        noise comes from `generator`, else from a generator on the pipeline's device seeded with `seed` (random
        when None). image + strength: img2img. latents: initial noise [B, 4, H/8, W/8], as diffusers takes it.
        original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning as (height, width) pairs and a
        (top, left) crop, default the output size and no crop (Podell et al. 2023, Sec. 2.2).
        output_type: "pil" (list of PIL images), "np" (float [B, H, W, 3] in [0, 1]) or "pt" ([B, 3, H, W]).
        eta: the stochastic share of ddim (default 0) and tcd (its gamma, default 0.3), in [0, 1].
        Returns the images, or (images, latents) with return_latents.
        """
        sampler = sampler or self.default_sampler()
        steps = default_steps(sampler) if steps is None else steps
        unet_cfg = self.components.unet.config
        lcm_guidance = getattr(unet_cfg, "time_cond_proj_dim", None) is not None
        if guidance_scale is None:
            guidance_scale = default_guidance(sampler, sdxl=self.sdxl, guidance_embedding=lcm_guidance)
        if image is not None and (height is None or width is None):
            w, h = _image_size(image)
            height, width = height or h, width or w
        height = height or self._default_size()
        width = width or self._default_size()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_generation_args(
            height=height, width=width, steps=steps, sampler=sampler, strength=strength if image is not None else None,
            batch=batch, prompts=prompts, multiple=self.vae_scale, output_type=output_type, eta=eta,
        )  # fmt: skip
        schedule = make_schedule(self.scheduler_config, sampler, steps)
        if image is not None:
            schedule = truncate_for_strength(schedule, strength)

        n = len(prompts) * batch
        embeds, pooled = self.encode_prompt(prompts, clip_skip)
        embeds, pooled = _repeat(embeds, batch), _repeat(pooled, batch)
        cfg = guidance_scale > 1.0 and not lcm_guidance
        if cfg:
            neg_embeds, neg_pooled = self._negative(negative_prompt, prompts, batch, embeds, pooled)
            embeds = torch.cat([neg_embeds, embeds])
            pooled = torch.cat([neg_pooled, pooled]) if pooled is not None else None
        embeds = embeds.to(self.dtype)
        extra = {}
        if self.sdxl:
            ids = [*(original_size or (height, width)), *crops_coords_top_left, *(target_size or (height, width))]
            time_ids = torch.tensor([ids], device=self.device, dtype=self.dtype)
            extra = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.repeat(embeds.shape[0], 1)}
        if lcm_guidance:  # LCM's guidance embedding w - 1 (Luo et al. 2023, Sec. 4.3) instead of a CFG batch
            extra["timestep_cond"] = _guidance_embedding(guidance_scale - 1, unet_cfg.time_cond_proj_dim, n).to(
                self.device, self.dtype
            )

        if generator is None:
            seed = int(torch.randint(0, 2**31, ())) if seed is None else seed
            generator = torch.Generator(self.device).manual_seed(seed)
        shape = (n, unet_cfg.in_channels, height // self.vae_scale, width // self.vae_scale)
        if image is not None:
            init = self._encode_image(image, n, height, width, generator)
            noise = _randn(shape, generator, self.device, self.dtype)
            x = add_noise(init, noise, schedule)
        else:
            if latents is None:
                latents = _randn(shape, generator, self.device, self.dtype)
            elif tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape}")
            x = initial_latents(latents.to(self.device, self.dtype), schedule)

        unet = self.components.unet

        def model_output(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not cfg:
                return unet(x_in, t, embeds, **extra)
            uncond, cond = unet(torch.cat([x_in, x_in]), t, embeds, **extra).chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        denoiser = Denoiser(model_output, self.scheduler_config.prediction_type)
        options = {} if eta is None else {"eta": eta}
        out = SAMPLERS[sampler](denoiser, x, schedule, generator=generator, callback=callback, **options)
        images = self.decode(out)
        if output_type == "pt":
            result = images
        elif output_type == "np":
            result = images.permute(0, 2, 3, 1).float().cpu().numpy()
        else:
            result = to_pil(images)
        return (result, out) if return_latents else result

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> images [B, 3, H, W] in [0, 1]."""
        vae, cfg = self.components.vae, self.components.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        vae_dtype = next(vae.parameters()).dtype
        return (vae.decode(z.to(vae_dtype)) / 2 + 0.5).clamp(0, 1)

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _default_size(self) -> int:
        sample_size = getattr(self.components.unet.config, "sample_size", None) or 64
        return sample_size * self.vae_scale

    def _negative(self, negative_prompt, prompts, batch, embeds, pooled):
        """The unconditional branch as diffusers builds it: SDXL base uses zeros when no negative prompt is given;
        otherwise the negative prompt (or "") is encoded without clip_skip."""
        if negative_prompt is None and self.sdxl and self.components.force_zeros_for_empty_prompt:
            return torch.zeros_like(embeds), (torch.zeros_like(pooled) if pooled is not None else None)
        negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) else negative_prompt
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
        neg, neg_pooled = self.encode_prompt(negatives, None)
        return _repeat(neg, batch), _repeat(neg_pooled, batch)

    def _encode_image(self, image, n: int, height: int, width: int, generator) -> torch.Tensor:
        """img2img start: the image's latents, sampled from the VAE posterior with the generator (as diffusers)."""
        x = image_to_tensor(image, height, width).to(self.device)
        x = x.expand(n, -1, -1, -1) if x.shape[0] == 1 else x
        if x.shape[0] != n:
            raise ValueError(f"{x.shape[0]} init images for {n} outputs; give one image or one per output")
        vae, cfg = self.components.vae, self.components.vae.config
        encoded = vae.encode(x.to(next(vae.parameters()).dtype))
        z = encoded if _is_taesd(vae) else encoded.sample(generator)
        if getattr(cfg, "shift_factor", None):
            z = z - cfg.shift_factor
        return (z * cfg.scaling_factor).to(self.dtype)


def _is_taesd(vae: torch.nn.Module) -> bool:
    return hasattr(vae.config, "decoder_block_out_channels")


def _repeat(t: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """[P, ...] -> [P * batch, ...], each prompt's copies together (diffusers' num_images_per_prompt order)."""
    return None if t is None else t.repeat_interleave(batch, dim=0)


def _randn(shape, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """N(0, 1) drawn on the generator's device, then moved (diffusers' randn_tensor), so a CPU generator gives the
    same numbers on any device."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _guidance_embedding(w: float, dim: int, n: int) -> torch.Tensor:
    """Sinusoidal embedding of w * 1000 (diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding)."""
    w = torch.full((n,), w * 1000.0)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def _image_size(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    return image.shape[-1], image.shape[-2]


def image_to_tensor(image: Image.Image | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A PIL image (resized to width x height, Lanczos, as diffusers' VaeImageProcessor) or a [B, 3, H, W] tensor in
    [0, 1] -> [B, 3, H, W] in [-1, 1]."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    else:
        x = image if image.ndim == 4 else image[None]
        if tuple(x.shape[-2:]) != (height, width):
            raise ValueError(f"init image tensor is {tuple(x.shape[-2:])} (H, W) but the output is {(height, width)}")
    return x.float() * 2 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit RGB images (rounded as diffusers' numpy_to_pil)."""
    arr = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]
