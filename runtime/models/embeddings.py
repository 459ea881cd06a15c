"""Timestep embeddings of the SD-family UNet, with diffusers' parameter names (`linear_1`, `linear_2`, `cond_proj`)."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [N] -> [N, dim] in fp32 (Ho et al. 2020, DDPM).

    Frequencies exp(-ln(max_period) * i / (dim/2 - freq_shift)); computed in the same order as diffusers'
    `get_timestep_embedding` so that fp32 results agree bit for bit. Built on the timesteps' device each call (no
    buffer that `.half()` would round), and free of host syncs.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection (diffusers' `Timesteps`); returns fp32."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-linear MLP on an embedding; `cond_proj` adds a projected condition first (LCM's guidance scale)."""

    def __init__(self, in_channels: int, embed_dim: int, cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("got a timestep condition, but this UNet has no time_cond_proj_dim (not an LCM UNet)")
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of w * 1000 per sample, LCM's guidance-scale condition [N] -> [N, dim] (diffusers'
    get_guidance_scale_embedding; the pipelines pass w = guidance_scale - 1)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb
