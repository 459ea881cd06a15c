"""The torch modules and host-side files a pipeline is assembled from (diffrt.assembly builds them)."""

from dataclasses import dataclass, field

import torch

from diffrt.tokenizer import CLIPTokenizer


@dataclass
class Components:
    """The modules and files one pipeline runs; text_encoder is None for an SDXL refiner-style checkpoint.

    A Components object belongs to one pipeline: its backend sets the modules' kernels and memory format.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module  # AutoencoderKL or AutoencoderTiny
    tokenizer: CLIPTokenizer | None
    text_encoder: torch.nn.Module | None
    scheduler_config: dict
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL base: zeros, not the encoded "", as the unconditional input
    is_random: bool = False  # random weights: the picture is noise
    controlnets: list[torch.nn.Module] = field(default_factory=list)  # ControlNetModels, in the order added

    def modules(self) -> dict[str, torch.nn.Module]:
        named = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        named["text_encoder_2"] = self.text_encoder_2
        named.update({f"controlnet_{i}": c for i, c in enumerate(self.controlnets)})
        return {name: module for name, module in named.items() if module is not None}
