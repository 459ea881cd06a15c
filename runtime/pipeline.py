"""Text-to-image and image-to-image: prompt -> text conditioning -> sampler loop over the denoiser -> decode.

The pipeline talks to its model through three roles only (diffrt.roles: text encoder, denoiser, image codec) and
leaves how they run to its backend (diffrt.backends). It follows diffusers' StableDiffusion(XL)Pipeline step for
step (tests/test_pipeline.py holds it to that), so the same weights, latents and seed give the same image.
"""

import os
from dataclasses import replace

import torch
from PIL import Image

from diffrt.backends import Backend, default_backend, make_backend
from diffrt.components import Components
from diffrt.images import to_output
from diffrt.model_spec import ModelSpec, spec_of
from diffrt.plan import GenerationPlan, make_plan, to_device_no_sync
from diffrt.prompt_cache import PromptCache
from diffrt.request import GenerationRequest, GenerationResult, memory_key, resolve_request
from diffrt.roles import Roles
from diffrt.samplers import Callback
from diffrt.tokenizer import CLIPTokenizer

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class Pipeline:
    """A loaded diffusion model ready to generate. Build it with `Pipeline.from_pretrained`."""

    def __init__(
        self,
        spec: ModelSpec,
        tokenizers: tuple[CLIPTokenizer | None, CLIPTokenizer | None],
        roles: Roles,
        backend: Backend,
        device: torch.device,
        dtype: torch.dtype,
        components: Components | None = None,
        prompt_cache_size: int = 32,
    ):
        self.spec, self.tokenizers, self.roles, self.backend = spec, tokenizers, roles, backend
        self.device, self.dtype = torch.device(device), dtype
        self.components = components  # the torch modules behind the roles, where there are any
        self.prompt_cache = PromptCache(prompt_cache_size)
        self._ran: dict[tuple, int | None] = {}  # memory_key -> vae_tile of requests that ran: no need to estimate
        self._loras = None  # diffrt.lora.LoRAWeights, made by the first load_lora

    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
        allow_pickle: bool = False,
        tokenizer: str | None = None,
        prediction_type: str | None = None,
        backend: "str | Backend | None" = None,
        seed: int = 0,
        controlnet: "str | os.PathLike | list | None" = None,
        vae_dtype: torch.dtype | None = None,
    ) -> "Pipeline":
        """From a diffusers pipeline folder, a single-file checkpoint (with `tokenizer=` folder(s), since such a
        file carries none), or a preset name (`diffrt.presets.PRESETS`: real architectures, random weights seeded
        with `seed`). prediction_type overrides the scheduler config's ("epsilon" / "v_prediction"): an SD2 single
        file does not say which it was trained for (v is assumed, as diffusers does; SD2-base and SD-Turbo need
        "epsilon"). backend: a name in diffrt.backends.BACKENDS or a backend object, this pipeline's own; default:
        cuda-graph on a GPU, torch elsewhere. controlnet: a ControlNet path (or a list of them) to add
        (`load_controlnet`). vae_dtype: the VAE's own dtype (default: the pipeline's, fp32 for the SDXL VAE under
        fp16: bf16 on a GPU, fp32 elsewhere; `default_vae_dtype`)."""
        from diffrt.assembly import open_model

        backend = make_backend(backend or default_backend(device))  # first: an unknown one fails before loading
        source = open_model(path_or_preset, variant=variant, allow_pickle=allow_pickle, tokenizer=tokenizer,
                            prediction_type=prediction_type, seed=seed)  # fmt: skip
        pipe = cls.from_components(source.components(device), device=device, dtype=dtype, backend=backend,
                                   vae_dtype=vae_dtype)  # fmt: skip
        for path in [] if controlnet is None else controlnet if isinstance(controlnet, list) else [controlnet]:
            pipe.load_controlnet(path, allow_pickle=allow_pickle)
        return pipe

    @classmethod
    def from_components(
        cls,
        components: Components,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: "str | Backend | None" = None,
        vae_dtype: torch.dtype | None = None,
    ) -> "Pipeline":
        """Own `components` (moved to device and dtype; the backend sets their kernels) and run them on `backend`.
        vae_dtype: as in from_pretrained."""
        device = torch.device(device)
        backend = make_backend(backend or default_backend(device))
        spec = spec_of(components)
        vae_dtype = vae_dtype or default_vae_dtype(spec, device, dtype)
        for name, module in components.modules().items():
            module.to(device=device, dtype=vae_dtype if name == "vae" else dtype).eval().requires_grad_(False)
        roles = backend.roles(components, dtype)
        return cls(spec, (components.tokenizer, components.tokenizer_2), roles, backend, device, dtype, components)

    @classmethod
    def from_export(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        backend: "str | Backend" = "onnxruntime",
    ) -> "Pipeline":
        """From a `diffrt export` folder alone (every file checked against its manifest first; no torch modules
        are built), run by `backend`: "onnxruntime" or "tensorrt", or such a backend object with its options
        (diffrt.backends.onnxruntime / .tensorrt). dtype: the latents', default the export's."""
        from diffrt.export.exported import open_export

        backend = make_backend(backend)
        if not hasattr(backend, "roles_for_export"):
            raise ValueError(f"backend {backend.name!r} runs torch modules; an export folder runs on onnxruntime or "
                             "tensorrt")  # fmt: skip
        model = open_export(folder)
        dtype = dtype or getattr(torch, model.manifest["dtype"])
        roles = backend.roles_for_export(model, device, dtype)
        return cls(model.spec, model.tokenizers(), roles, backend, torch.device(device), dtype)

    def load_controlnet(self, path_or_module: "str | os.PathLike | torch.nn.Module", allow_pickle: bool = False) -> int:
        """Add a ControlNet (a diffusers folder, a single file, or a ControlNetModel); returns its index. Requests
        then give one control image per ControlNet, in the order they were added."""
        from diffrt.loading.controlnet import check_fits, load_controlnet

        if isinstance(path_or_module, torch.nn.Module):
            module, source = path_or_module, type(path_or_module).__name__
        else:
            unet_config = self.components.unet.config
            module = load_controlnet(path_or_module, allow_pickle=allow_pickle, unet_config=unet_config)
            source = os.fspath(path_or_module)
        check_fits(module, self.components.unet, source)
        module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.components.controlnets.append(module)
        self.roles = self.backend.roles(self.components, self.dtype)
        self.spec = replace(self.spec, controlnets=len(self.components.controlnets))
        return len(self.components.controlnets) - 1

    def load_lora(
        self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None, allow_pickle: bool = False
    ) -> str:
        """Fuse a LoRA file (diffusers/PEFT or kohya/A1111 layout; UNet and text encoders) into the weights in place,
        at `scale`, beside those already loaded; returns its name (default: the file's stem), which `unload_lora`
        and `set_lora_scale` take. Loading a name again replaces that LoRA. Costs nothing per step, keeps captured
        graphs valid (the same tensors hold the new weights) and clears the prompt cache when a text encoder
        changed. Not to be called while this pipeline is generating."""
        from diffrt.loading.lora import read_lora
        from diffrt.lora import LoRAWeights, match_lora

        if self.components is None:
            raise ValueError(f"backend {self.backend.name!r} runs no torch modules; LoRA needs their weights")
        lora = read_lora(path, allow_pickle=allow_pickle)
        layers = match_lora(lora, {n: m for n, m in self.components.modules().items() if n in LORA_COMPONENTS})
        if self._loras is None:
            self._loras = LoRAWeights(self.components.modules())
        name = name or os.path.splitext(os.path.basename(lora.path))[0]
        self._weights_changed(self._loras.add(name, lora.path, layers, scale))
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's scale (its layers are fused again from the original weights)."""
        self.set_lora_scales({name: scale})

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Change several loaded LoRAs' scales in one pass; {"a": 0.0, "b": 1.0} switches from LoRA a to LoRA b
        (both loaded once) without reading a file or recapturing a graph; a LoRA at scale 0 costs nothing."""
        self._weights_changed(self._require_loras().set_scales(scales))

    def unload_lora(self, name: str | None = None) -> None:
        """Take a LoRA out (None: all); the weights no LoRA touches any more are the original ones, bit for bit."""
        self._weights_changed(self._require_loras().remove(name))

    @property
    def loras(self) -> dict[str, float]:
        """The loaded LoRAs' names and scales."""
        return {} if self._loras is None else {n: lora.scale for n, lora in self._loras.loaded.items()}

    def _require_loras(self):
        if self._loras is None:
            raise ValueError("no LoRA is loaded; load one with pipe.load_lora(PATH)")
        return self._loras

    def _weights_changed(self, components: set[str]) -> None:
        if components & {"text_encoder", "text_encoder_2"}:
            self.prompt_cache.clear()  # cached embeddings came from the old text encoder weights

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return self.spec.vae_scale

    def default_sampler(self) -> str:
        return self.spec.default_sampler

    def encode_prompt(self, prompts: list[str], clip_skip: int | None = None):
        """(prompt_embeds [B, 77, C], pooled or None), cached per (prompts, clip_skip)."""

        def encode():
            tokenizer, tokenizer_2 = self.tokenizers
            ids = to_device_no_sync(tokenizer(prompts), self.device) if tokenizer is not None else None
            ids_2 = to_device_no_sync(tokenizer_2(prompts), self.device) if tokenizer_2 is not None else None
            with torch.inference_mode():
                return self.roles.text_encoder(ids, ids_2, clip_skip)

        return self.prompt_cache.get((tuple(prompts), clip_skip), encode)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults filled in; ValueError naming each mistake if it cannot run."""
        return resolve_request(request, self.spec, device=self.device, dtype=self.dtype, weights_resident=True,
                               known_to_fit=self._ran)  # fmt: skip

    def plan(self, request: GenerationRequest, generator: torch.Generator | None = None) -> GenerationPlan:
        """The host's part of a resolved request: schedule, conditioning, seed and starting latents."""
        return make_plan(request, self.spec, self.encode_prompt, self.roles.codec, self.device, self.dtype, generator)

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, *, generator: torch.Generator | None = None, callback: Callback | None = None
    ) -> GenerationResult:
        """Generate what `request` asks for. generator: noise from it instead of a new one seeded with the
        request's seed (a CPU generator reproduces diffusers' numbers on any device). callback(step, latents,
        denoised) after every step (a backend that replays graphs calls it after the run)."""
        # 1. Resolve and check the request (host; raises before any work).
        asked, request = request, self.resolve(request)
        # 2. Plan on the host: schedule, conditioning, noise, static shapes.
        plan = self.plan(request, generator)
        # 3. Run the plan on the device, with no host sync: the sampler loop, then the decode.
        images, latents = self.backend.run(plan, self.roles, callback)
        self._ran[memory_key(request, self.spec, asked.vae_tile)] = request.vae_tile
        # 4. Post-process into the requested output type (the device-to-host copy happens here).
        return GenerationResult(to_output(images, request.output_type), latents, plan.seed)

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
        callback: Callback | None = None,
        eta: float | None = None,
        check_memory: bool = True,
        control_image=None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
    ):
        """Generate `batch` images per prompt; the fields are GenerationRequest's (diffrt.request).

        Returns the images ("pil": a list of PIL images, "np": float [B, H, W, 3] in [0, 1], "pt": [B, 3, H, W]), or
        (images, latents) with return_latents. `generate(GenerationRequest(...))` also reports the seed used.
        """
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, steps=steps, sampler=sampler,
            guidance_scale=guidance_scale, eta=eta, seed=seed, batch=batch, image=image, strength=strength,
            latents=latents, clip_skip=clip_skip, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size, output_type=output_type,
            check_memory=check_memory, control_image=control_image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
        )  # fmt: skip
        result = self.generate(request, generator=generator, callback=callback)
        return (result.images, result.latents) if return_latents else result.images


def default_vae_dtype(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The pipeline's dtype, except for a VAE that overflows in fp16 (SDXL's): diffusers upcasts it to fp32; on a GPU
    with bf16 it runs in bf16, which has fp32's exponent range: half the fp32 decode's time (SDXL 1024²: 30.8 vs
    60.9 ms on an H200) for an error of PSNR 50 dB / max 0.035 in 0..1 against the fp32 decode, where fp16 would
    give 68 dB (benchmarks/results/vae_precision_h200.json). vae_dtype=torch.float32 keeps diffusers' numbers."""
    if not (spec.memory.vae_upcast and dtype == torch.float16):
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
