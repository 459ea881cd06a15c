"""What a pipeline knows of its model before it runs it: enough to fill a request's defaults and refuse a bad one.

A ModelSpec is read from the component configs alone (no weights are needed), so the CLI checks a request before it
loads anything, and the pipeline checks every call with the same code.
"""

import functools
from dataclasses import dataclass

from diffrt.components import Components
from diffrt.memory import MemoryModel
from diffrt.models.clip import CLIPTextConfig
from diffrt.models.taesd import TAESDConfig
from diffrt.models.text_conditioning import deepest_clip_skip
from diffrt.models.unet_config import DOWN_TYPES, UNetConfig
from diffrt.models.vae import AutoencoderKLConfig
from diffrt.sampler_registry import sampler_for_scheduler
from diffrt.schedules import SchedulerConfig


@dataclass(frozen=True)
class ModelSpec:
    sdxl: bool  # SDXL's added conditioning: a pooled text embedding and the micro-conditioning time ids
    latent_channels: int
    vae_scale: int  # image pixels per latent pixel along each side (8 for the SD family and TAESD)
    sample_size: int | None  # the UNet's training latent size, when its config says
    guidance_embedding_dim: int | None  # LCM UNets: the guidance scale goes in as an embedding, not a CFG batch
    scheduler_config: dict
    deepest_clip_skip: int
    memory: MemoryModel
    force_zeros_for_empty_prompt: bool = True
    is_random: bool = False  # random weights (a preset): the picture is noise

    @property
    def default_sampler(self) -> str:
        return sampler_for_scheduler(self.scheduler_config.get("_class_name", ""))

    @property
    def default_size(self) -> int:
        return (self.sample_size or 64) * self.vae_scale

    @functools.cached_property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig.from_diffusers(self.scheduler_config)


def model_spec(
    unet: UNetConfig,
    vae: AutoencoderKLConfig | TAESDConfig,
    text_encoders: tuple[CLIPTextConfig | None, CLIPTextConfig | None],
    scheduler_config: dict,
    parameters: int,
    *,
    force_zeros_for_empty_prompt: bool = True,
    is_random: bool = False,
) -> ModelSpec:
    """The spec of a UNet + VAE + text encoder(s) model from their configs and its total parameter count."""
    sdxl = unet.addition_embed_type == "text_time"
    sample_size = unet.sample_size[0] if isinstance(unet.sample_size, tuple) else unet.sample_size
    return ModelSpec(
        sdxl=sdxl,
        latent_channels=unet.in_channels,
        vae_scale=vae.vae_scale_factor,
        sample_size=sample_size,
        guidance_embedding_dim=unet.time_cond_proj_dim,
        scheduler_config=dict(scheduler_config),
        deepest_clip_skip=deepest_clip_skip(*text_encoders),
        memory=MemoryModel(
            parameters=parameters,
            unet_levels=tuple(
                (channels, unet.layers_per_block[i] + (i < len(unet.block_out_channels) - 1), DOWN_TYPES[kind])
                for i, (channels, kind) in enumerate(zip(unet.block_out_channels, unet.down_block_types, strict=True))
            ),
            decoder_levels=_decoder_levels(vae),
            vae_upcast=sdxl and vae.force_upcast,
        ),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        is_random=is_random,
    )


def spec_of(components: Components) -> ModelSpec:
    """The spec of built components (their configs and parameter counts)."""
    encoders = (components.text_encoder, components.text_encoder_2)
    return model_spec(
        components.unet.config,
        components.vae.config,
        tuple(e.config if e is not None else None for e in encoders),
        components.scheduler_config,
        sum(p.numel() for m in components.modules().values() for p in m.parameters()),
        force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt,
        is_random=components.is_random,
    )


def _decoder_levels(vae: AutoencoderKLConfig | TAESDConfig) -> tuple[int, ...]:
    """Channels at each decoder resolution, latents first: a level's upsample carries its channels one level up."""
    kl = isinstance(vae, AutoencoderKLConfig)
    levels = list(vae.block_out_channels[::-1] if kl else vae.decoder_block_out_channels)
    return tuple(max(c, levels[i - 1] if i else 0) for i, c in enumerate(levels))
