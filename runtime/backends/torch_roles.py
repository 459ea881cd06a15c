"""The roles (diffrt.roles) implemented by diffrt's own torch modules."""

from dataclasses import replace

import torch
from torch import Tensor, nn

from diffrt.models.text_conditioning import PromptEncoder
from diffrt.roles import Conditioning
from diffrt.samplers import NoiseSource


class TorchTextEncoder:
    """CLIP text encoder(s) -> the UNet's text conditioning (diffrt.models.text_conditioning)."""

    def __init__(self, text_encoder: nn.Module | None, text_encoder_2: nn.Module | None = None) -> None:
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def __call__(
        self, ids: Tensor | None, ids_2: Tensor | None, clip_skip: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        return PromptEncoder(self.text_encoder, self.text_encoder_2, clip_skip)(ids, ids_2)


class TorchDenoiser:
    """An SD-family UNet2DConditionModel as the pipeline's denoiser."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet

    def prepare(self, cond: Conditioning) -> Conditioning:
        """cond with every cross-attention's keys and values of its text projected once, for all of a loop's steps
        (where the UNet's ops join them: ops.joint_cross_attention). An exported graph's UNet (GraphUNet) has no
        such step: its graph projects inside."""
        project = getattr(self.unet, "cross_attention_kv", None)
        return cond if project is None else replace(cond, prepared=project(cond.embeds))

    def __call__(self, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        prepared = {} if cond.prepared is None else {"cross_attention_kv": cond.prepared}
        return self.unet(
            latents,
            timestep,
            cond.embeds,
            text_embeds=cond.text_embeds,
            time_ids=cond.time_ids,
            timestep_cond=cond.timestep_cond,
            down_block_additional_residuals=cond.down_residuals,
            mid_block_additional_residual=cond.mid_residual,
            **prepared,
        )


class TorchControlNet:
    """diffrt's ControlNetModel as a ControlNet role: it reads the denoiser's conditioning (text, SDXL's added
    inputs; never LCM's guidance embedding, as diffusers' ControlNet pipelines pass none)."""

    def __init__(self, controlnet: nn.Module) -> None:
        self.controlnet = controlnet

    def __call__(
        self, latents: Tensor, timestep: Tensor, cond: Conditioning, image: Tensor, scale: Tensor | float
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        return self.controlnet(latents, timestep, cond.embeds, image, scale, cond.text_embeds, cond.time_ids)


class TorchImageCodec:
    """AutoencoderKL or AutoencoderTiny as the image codec: pixel range, latent scaling and the posterior sample
    inside, as diffusers' pipelines apply them. The VAE runs in its own dtype (the SDXL VAE in fp32 under fp16).

    `vae` is the module, or any object with its `config`, `encode` and `decode` (an exported graph's,
    diffrt.backends.graph_roles.GraphVae); such an object has no parameters, so it names its `vae_dtype`."""

    def __init__(self, vae: nn.Module, latent_dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> None:
        self.vae = vae
        self.latent_dtype = latent_dtype
        self._vae_dtype = vae_dtype
        config = vae.config
        self.scaling_factor = config.scaling_factor
        self.shift_factor = getattr(config, "shift_factor", None) or 0.0
        self.has_posterior = not hasattr(config, "decoder_block_out_channels")  # TAESD encodes to latents directly

    @property
    def vae_dtype(self) -> torch.dtype:
        return self._vae_dtype or next(self.vae.parameters()).dtype

    def encode(self, images: Tensor, noise: NoiseSource | None = None) -> Tensor:
        encoded = self.vae.encode((images * 2 - 1).to(self.vae_dtype))
        if self.has_posterior:  # diffusers' retrieve_latents(..., sample_mode="sample")
            encoded = encoded.mean + encoded.std * (noise or NoiseSource()).like(encoded.mean)
        return ((encoded - self.shift_factor) * self.scaling_factor).to(self.latent_dtype)

    def decode(self, latents: Tensor) -> Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return (self.vae.decode(z.to(self.vae_dtype)) / 2 + 0.5).clamp(0, 1)
