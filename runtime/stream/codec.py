"""The stream's image codec: the pipeline's own VAE, or another (TAESD) run the way the pipeline's backend runs its
VAE (its kernels, its memory format) in the pipeline's dtype."""

import os

import torch
from torch import nn

from diffrt.backends.torch_roles import TorchImageCodec
from diffrt.models.ops import set_ops


def stream_codec(pipe, vae: "nn.Module | str | os.PathLike | None" = None):
    """pipe's codec role, or a TorchImageCodec over `vae` (an AutoencoderTiny/AutoencoderKL module, or a folder
    diffrt.load_model reads) moved to the pipeline's device and dtype and set up as its backend sets its VAE."""
    if vae is None:
        return pipe.roles.codec
    if not isinstance(vae, nn.Module):
        from diffrt.loading import load_model

        vae = load_model(vae)
    vae.to(device=pipe.device, dtype=pipe.dtype).eval().requires_grad_(False)
    ops = getattr(pipe.backend, "ops", None)
    if ops is not None:
        set_ops(vae, ops)
    if getattr(pipe.backend, "channels_last", False):
        vae.to(memory_format=torch.channels_last)
    return TorchImageCodec(vae, pipe.dtype)
