"""The three roles a pipeline talks to, and the conditioning record the denoiser takes.

The pipeline calls these and nothing else of a model: torch modules implement them today (diffrt.backends.
torch_roles), exported ONNX Runtime sessions and TensorRT engines can stand in for them. A role is any object with
the call signature below; a plain function is a denoiser.
"""

from dataclasses import dataclass, fields
from typing import Protocol

from torch import Tensor

from diffrt.samplers import NoiseSource


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on besides latents and timestep; each tensor has the latents' batch."""

    embeds: Tensor  # the text encoder's hidden states, [B, 77, C] (diffusers' encoder_hidden_states)
    text_embeds: Tensor | None = None  # SDXL: the pooled, projected text embedding [B, P]
    time_ids: Tensor | None = None  # SDXL: original size, crop top-left, target size [B, 6]
    timestep_cond: Tensor | None = None  # LCM: the guidance-scale embedding [B, time_cond_proj_dim]
    down_residuals: tuple[Tensor, ...] | None = None  # ControlNet: one per UNet skip, added to it
    mid_residual: Tensor | None = None  # ControlNet: added to the UNet's mid-block output
    # The denoiser's own work on `embeds` done once for every step of a loop (`Denoiser.prepare`; TorchDenoiser: every
    # cross-attention's keys and values): not an input, derived from them
    prepared: object | None = None

    def tensors(self) -> dict[str, Tensor | tuple[Tensor, ...]]:
        """The input fields that are set, by name (not `prepared`)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "prepared" and getattr(self, f.name) is not None
        }


class TextEncoder(Protocol):
    def __call__(
        self, ids: Tensor | None, ids_2: Tensor | None, clip_skip: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Token ids [B, 77] of the first and second tokenizer (SDXL; None where the model has no such encoder) ->
        (hidden states [B, 77, C], pooled [B, P] or None), as diffusers' encode_prompt computes them."""
        ...


class Denoiser(Protocol):
    def __call__(self, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """Latents [B, C, h, w], timestep (0-d float32 tensor on their device) -> model output like latents."""
        ...


def prepared(denoiser: Denoiser, cond: Conditioning) -> Conditioning:
    """`cond` with the denoiser's once-per-loop work on it done (`denoiser.prepare(cond)`, for a denoiser that has
    one; device work only, so it can be captured with the loop), for every step of one sampler loop."""
    prepare = getattr(denoiser, "prepare", None)
    return cond if prepare is None else prepare(cond)


class ControlNet(Protocol):
    def __call__(
        self, latents: Tensor, timestep: Tensor, cond: Conditioning, image: Tensor, scale: Tensor | float
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """The denoiser's inputs and a control image [B, C, H, W] in [0, 1] -> (down residuals, mid residual), scaled
        by `scale`; a controlled denoiser (diffrt.control) adds them to the UNet's through the conditioning."""
        ...


class ImageCodec(Protocol):
    def encode(self, images: Tensor, noise: NoiseSource | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> the UNet's latents [B, C, H/f, W/f]: scaled (and shifted) as the
        model expects, sampled from the posterior with `noise` where the codec has one (KL VAE; None: its mean)."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """The UNet's latents -> images [B, 3, H, W] in [0, 1]."""
        ...


@dataclass
class Roles:
    """One model's three roles, as a backend made them."""

    text_encoder: TextEncoder
    denoiser: Denoiser
    codec: ImageCodec
    controlnets: tuple[ControlNet, ...] = ()  # in the order the pipeline's ControlNets were added
