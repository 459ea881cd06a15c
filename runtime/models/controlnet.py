"""ControlNet (Zhang et al. 2023, https://arxiv.org/abs/2302.05543) for the SD-family UNet: SD1.x, SD2.x and SDXL.

A trainable copy of the UNet's encoder (conv_in, time embedding, down blocks, mid block) that also sees a control
image through a small conv stack, and returns one zero-initialised 1x1 conv output per UNet skip and one for the mid
block, scaled by the conditioning scale: the residuals the UNet adds (its `down_block_additional_residuals` /
`mid_block_additional_residual`). Laid out as diffusers' ControlNetModel, so its state_dict keys are diffusers'.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.models.embeddings import TimestepEmbedding, Timesteps
from diffrt.models.unet_blocks import CrossAttention, DownBlock, MidBlock
from diffrt.models.unet_config import _DIFFUSERS_DEFAULTS, DOWN_TYPES, MID_TYPES, UNetConfig, depths_per_layer

UP_MIRROR = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    """The encoder half of a UNetConfig (validated as one) plus the control image's conv stack."""

    unet: UNetConfig  # the encoder's architecture; its up path mirrors the down path and is not built
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False  # controlnet_conditioning_channel_order "bgr": the control image's channels are flipped

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "ControlNetConfig":
        """Read a diffusers ControlNetModel `config.json` dict (missing keys take diffusers' defaults)."""
        class_name = config.get("_class_name", "ControlNetModel")
        if class_name != "ControlNetModel":
            raise ValueError(f"config is for {class_name!r}, not 'ControlNetModel'")
        c = dict(config)
        own = {k: c.pop(k) for k in list(c) if k in _CONTROLNET_KEYS}
        if own.get("global_pool_conditions"):
            raise ValueError("global_pool_conditions (a guess-mode-only ControlNet such as shuffle) is not supported")
        order = own.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order {order!r} must be 'rgb' or 'bgr'")
        c.pop("addition_embed_type_num_heads", None)
        if c.get("time_embedding_dim") is not None or c.get("time_cond_proj_dim") is not None:
            raise ValueError("a ControlNet has no time_embedding_dim / time_cond_proj_dim option")
        down = c.get("down_block_types", _DIFFUSERS_DEFAULTS["down_block_types"])
        unknown = [t for t in down if t not in UP_MIRROR]
        if unknown:
            raise ValueError(f"down_block_types {list(down)}: {unknown} not supported; supported: {list(UP_MIRROR)}")
        c["up_block_types"] = [UP_MIRROR[t] for t in reversed(down)]
        unet = UNetConfig.from_diffusers({**c, "_class_name": "UNet2DConditionModel"})
        channels = tuple(own.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
        return cls(unet, own.get("conditioning_channels", 3), channels, order == "bgr")


# Keys of ControlNetModel's config that UNet2DConditionModel's lacks (the rest are shared).
_CONTROLNET_KEYS = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "controlnet_conditioning_channel_order",
    "global_pool_conditions",
)


class ControlNetConditioningEmbedding(nn.Module):
    """Control image [B, C, H, W] in [0, 1] -> features at the latents' size: conv-SiLU, then (conv-SiLU,
    stride-2 conv-SiLU) per step down, then a zero-initialised conv (diffusers' names)."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], embedding_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNetModel(nn.Module):
    """(latents, timestep, text, control image, scale) -> (one residual per UNet skip, the mid residual)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        c = config.unet
        ch, n, temb = c.block_out_channels, len(c.block_out_channels), c.time_embed_dim
        groups, eps = c.norm_num_groups, c.norm_eps

        def attention(has_attention: bool, level: int, depth, count: int) -> CrossAttention | None:
            if not has_attention:
                return None
            return CrossAttention(
                c.num_attention_heads[level], depths_per_layer(depth, count), c.cross_attention_dim,
                c.use_linear_projection,
            )  # fmt: skip

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        text_time = c.addition_embed_type == "text_time"
        self.add_time_proj = (
            Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift) if text_time else None
        )
        self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb) if text_time else None
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        self.down_blocks = nn.ModuleList()
        zero_convs = [nn.Conv2d(ch[0], ch[0], 1)]  # conv_in's output is the first skip
        for i, kind in enumerate(c.down_block_types):
            layers = c.layers_per_block[i]
            attn = attention(DOWN_TYPES[kind], i, c.transformer_layers_per_block[i], layers)
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], temb, layers, groups, eps, attn, i < n - 1))
            zero_convs += [nn.Conv2d(ch[i], ch[i], 1) for _ in range(layers + (i < n - 1))]
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)
        mid_attn = attention(MID_TYPES[c.mid_block_type], n - 1, c.transformer_layers_per_block[-1], 1)
        self.mid_block = MidBlock(ch[-1], temb, groups, eps, mid_attn)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float | torch.Tensor = 1.0,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """sample [B, in, h, w] (the UNet's input), timestep 0-d or [B], encoder_hidden_states [B, S, C], the control
        image [B, conditioning_channels, 8h, 8w] in [0, 1]; SDXL also text_embeds and time_ids. conditioning_scale:
        a number or a 0-d tensor (a device tensor lets a captured graph take a new scale without recapture)."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        t = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this ControlNet has SDXL's added conditioning: pass text_embeds and time_ids")
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        if self.config.bgr:
            controlnet_cond = controlnet_cond.flip(1)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips.extend(block_skips)
        h = self.mid_block(h, emb, encoder_hidden_states)
        down = tuple(conv(s) * conditioning_scale for conv, s in zip(self.controlnet_down_blocks, skips, strict=True))
        return down, self.controlnet_mid_block(h) * conditioning_scale


def controlnet_from_unet(unet: nn.Module, conditioning_channels: int = 3, channels=(16, 32, 96, 256)):
    """A ControlNet initialised as its paper does: the UNet's encoder weights copied, the output convs and the
    control image's last conv zero (so it starts as the bare UNet). Returns (module, diffusers config dict)."""
    c = unet.config
    if len(set(c.layers_per_block)) != 1:
        raise ValueError(f"layers_per_block {c.layers_per_block}: a ControlNet has one res-block count for all levels")
    config = {
        "_class_name": "ControlNetModel",
        "in_channels": c.in_channels,
        "conditioning_channels": conditioning_channels,
        "down_block_types": list(c.down_block_types),
        "mid_block_type": c.mid_block_type,
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block[0],  # diffusers' ControlNetModel takes one count for every level
        "transformer_layers_per_block": [d if isinstance(d, int) else list(d) for d in c.transformer_layers_per_block],
        "attention_head_dim": list(c.num_attention_heads),
        "cross_attention_dim": c.cross_attention_dim,
        "use_linear_projection": c.use_linear_projection,
        "upcast_attention": c.upcast_attention,
        "norm_num_groups": c.norm_num_groups,
        "norm_eps": c.norm_eps,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "addition_embed_type": c.addition_embed_type,
        "addition_time_embed_dim": c.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": c.projection_class_embeddings_input_dim,
        "conditioning_embedding_out_channels": list(channels),
    }
    model = ControlNetModel(ControlNetConfig.from_diffusers(config))
    own = model.state_dict()
    copied = {k: v for k, v in unet.state_dict().items() if k in own and not k.startswith("time_embedding.cond_proj")}
    missing, _ = model.load_state_dict(copied, strict=False)
    assert all(k.startswith("controlnet_") for k in missing), missing
    with torch.no_grad():
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block,
                     model.controlnet_cond_embedding.conv_out]:  # fmt: skip
            conv.weight.zero_()
            conv.bias.zero_()
    return model, config
