"""The SD-family denoising UNet: SD1.x, SD2.x (eps and v-prediction), SDXL, LCM, inpainting.

Latent-diffusion UNet (Rombach et al. 2022, https://arxiv.org/abs/2112.10752) with SDXL's added text/time
conditioning (Podell et al. 2023, https://arxiv.org/abs/2307.01952), laid out as diffusers' UNet2DConditionModel so
that its state_dict keys are exactly diffusers'. What the output means (eps, v, ...) is the scheduler's business.
"""

from collections.abc import Sequence

import torch
from torch import nn

from diffrt.models.cross_attention_kv import CrossAttentionKV, CrossAttentionProjections
from diffrt.models.embeddings import TimestepEmbedding, Timesteps
from diffrt.models.joint_linear import JointLinear
from diffrt.models.layers import (
    BasicTransformerBlock,
    GroupNorm,
    ResnetBlock2D,
    joint_block_biases,
    joint_time_projections,
)
from diffrt.models.ops import TORCH_OPS
from diffrt.models.unet_blocks import CrossAttention, DownBlock, MidBlock, UpBlock
from diffrt.models.unet_config import (
    DOWN_TYPES,
    MID_TYPES,
    PRESETS,
    UP_TYPES,
    Depth,
    UNetConfig,
    depths_per_layer,
)

__all__ = ["PRESETS", "UNet2DConditionModel", "UNetConfig"]


class UNet2DConditionModel(nn.Module):
    """eps / v / LCM prediction of an SD-family UNet given latents, timestep and text; diffusers' state_dict keys."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, n, temb = c.block_out_channels, len(c.block_out_channels), c.time_embed_dim
        groups, eps = c.norm_num_groups, c.norm_eps

        def attention(has_attention: bool, level: int, depth: Depth, count: int) -> CrossAttention | None:
            if not has_attention:
                return None
            heads, depths = c.num_attention_heads[level], depths_per_layer(depth, count)
            return CrossAttention(heads, depths, c.cross_attention_dim, c.use_linear_projection)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb, c.time_cond_proj_dim)
        text_time = c.addition_embed_type == "text_time"
        self.add_time_proj = (
            Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift) if text_time else None
        )
        self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb) if text_time else None

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            layers = c.layers_per_block[i]
            attn = attention(DOWN_TYPES[kind], i, c.transformer_layers_per_block[i], layers)
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], temb, layers, groups, eps, attn, i < n - 1))

        mid_attn = attention(MID_TYPES[c.mid_block_type], n - 1, c.transformer_layers_per_block[-1], 1)
        self.mid_block = MidBlock(ch[-1], temb, groups, eps, mid_attn) if c.mid_block_type else None

        up_depths = c.reverse_transformer_layers_per_block or c.transformer_layers_per_block[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(c.up_block_types):
            level, layers = n - 1 - i, c.layers_per_block[n - 1 - i] + 1
            attn = attention(UP_TYPES[kind], level, up_depths[i], layers)
            self.up_blocks.append(
                UpBlock(
                    in_channels=ch[min(level + 1, n - 1)],  # from the level below (the mid block's for the first)
                    skip_channels=ch[max(level - 1, 0)],  # the last resnet's skip: the level above's downsample
                    out_channels=ch[level],
                    temb_channels=temb,
                    num_layers=layers,
                    groups=groups,
                    eps=eps,
                    attention=attn,
                    add_upsample=i < n - 1,
                )
            )

        self.conv_norm_out = GroupNorm(groups, ch[0], eps, silu=True)  # diffusers' conv_norm_out + conv_act
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)
        # With ops.joint_time_projections: every ResNet block's time-embedding projection in one GEMM (not a module:
        # the state dict keeps each block's time_emb_proj)
        blocks = [m for m in self.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
        self._time_projections = (blocks, JointLinear(*(b.time_emb_proj for b in blocks)))
        # With ops.joint_cross_attention: every cross-attention's k and v of the text in one GEMM (not a module either)
        cross = [m.attn2 for m in self.modules() if isinstance(m, BasicTransformerBlock)]
        self._cross_attention = CrossAttentionProjections(cross) if cross else None

    def cross_attention_kv(self, encoder_hidden_states: torch.Tensor) -> CrossAttentionKV | None:
        """Every cross-attention layer's keys and values of this text, from one GEMM, for `forward`'s
        cross_attention_kv: a sampler loop projects the text once for all its steps. None where this UNet's ops do
        not join them (ops.joint_cross_attention off) or it has no cross-attention."""
        if not self.ops.joint_cross_attention or self._cross_attention is None:
            return None
        return self._cross_attention(encoder_hidden_states)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        cross_attention_kv: CrossAttentionKV | None = None,
    ) -> torch.Tensor:
        """sample [B, in, H, W], timestep 0-d or [B] (or a number), encoder_hidden_states [B, S, cross_attention_dim];
        SDXL also text_embeds [B, pooled] and time_ids [B, 6]; LCM optionally timestep_cond [B, time_cond_proj_dim];
        a ControlNet's residuals, one per skip and one for the mid block, are added to them (diffusers' names).
        cross_attention_kv: `self.cross_attention_kv(encoder_hidden_states)`, projected once for several calls with
        the same text (without it, the call projects the text itself).
        Returns [B, out, H, W]. Any H, W: an upsample lands on its skip's size, as diffusers does for odd sizes."""
        # A number is a convenience (a new tensor each call); a loop that is captured should pass a device tensor.
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        # [B] without a host sync (expand is a view); the embedding is fp32, then the model's dtype, as diffusers does.
        t = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype), timestep_cond)
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet has SDXL's added conditioning: pass text_embeds and time_ids")
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids were given, but this UNet has no added conditioning (not SDXL)")
        if self.ops.joint_time_projections and self._time_projections[0]:
            joint = joint_block_biases if self.ops.joint_block_biases and self.ops.fold_bias else joint_time_projections
            emb = joint(*self._time_projections, emb)

        kv = cross_attention_kv if cross_attention_kv is not None else self.cross_attention_kv(encoder_hidden_states)
        if kv is not None:  # the blocks pass the text down to the layers, which take their k and v from it
            encoder_hidden_states = kv.context_carrying(encoder_hidden_states)

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips.extend(block_skips)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"{len(down_block_additional_residuals)} down-block residuals for this UNet's {len(skips)} skips"
                )
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            # Upsample onto the next skip's size: 2x when H, W divide by 2^levels, else what the stride-2 convs made.
            h = block(h, block_skips, emb, encoder_hidden_states, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(self.conv_norm_out(h))
