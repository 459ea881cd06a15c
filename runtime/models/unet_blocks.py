"""The UNet's resolution levels: down, middle and up blocks, with diffusers' parameter names.

One class per direction covers both of diffusers' variants (`DownBlock2D` / `CrossAttnDownBlock2D`, ...): a level
with cross-attention has an `attentions` list, one Transformer2DModel after each resnet; a level without has none.
"""

from dataclasses import dataclass

import torch
from torch import nn

from diffrt.models.layers import Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D


@dataclass(frozen=True)
class CrossAttention:
    """What a level's Transformer2DModels look like: head count, depth per resnet, text width, projection kind."""

    heads: int
    depths: tuple[int, ...]
    context_dim: int
    linear: bool

    def build(self, channels: int, layer: int, groups: int) -> Transformer2DModel:
        # diffusers: head width = channels // head count, whether the config called the count "attention_head_dim".
        return Transformer2DModel(
            channels, self.heads, channels // self.heads, self.context_dim, self.depths[layer], groups, self.linear
        )


class DownBlock(nn.Module):
    """`num_layers` x (ResnetBlock2D [+ Transformer2DModel]), then an optional stride-2 conv; every output is a skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        groups: int,
        eps: float,
        attention: CrossAttention | None,
        add_downsample: bool,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        )
        self.attentions = (
            nn.ModuleList(attention.build(out_channels, i, groups) for i in range(num_layers)) if attention else None
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResnetBlock2D, then (Transformer2DModel, ResnetBlock2D) when it has attention (UNetMidBlock2DCrossAttn);
    a single ResnetBlock2D without (UNetMidBlock2D as UNet2DConditionModel builds it)."""

    def __init__(self, channels: int, temb_channels: int, groups: int, eps: float, attention: CrossAttention | None):
        super().__init__()
        n = 2 if attention else 1
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(n))
        self.attentions = nn.ModuleList([attention.build(channels, 0, groups)]) if attention else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        if self.attentions is not None:
            h = self.resnets[1](self.attentions[0](h, context), temb)
        return h


class UpBlock(nn.Module):
    """`num_layers` x (concat a skip, ResnetBlock2D [+ Transformer2DModel]), then an optional 2x nearest upsample.

    The last resnet's skip comes from the level above (`skip_channels`), the others from this level.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        groups: int,
        eps: float,
        attention: CrossAttention | None,
        add_upsample: bool,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (in_channels if i == 0 else out_channels) + (skip_channels if i == num_layers - 1 else out_channels),
                out_channels,
                temb_channels,
                groups,
                eps,
            )
            for i in range(num_layers)
        )
        self.attentions = (
            nn.ModuleList(attention.build(out_channels, i, groups) for i in range(num_layers)) if attention else None
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: torch.Size | None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h
