"""Building blocks shared by the UNet and the VAE, with diffusers' parameter names.

Two operations dominate a diffusion UNet besides its matrix products: GroupNorm (+SiLU) and attention; after them
come the elementwise passes around the matrix products (a convolution's bias, the residual adds, GEGLU's gate,
nearest upsampling). The modules that run them call them through their `ops` record (diffrt.models.ops), so a
backend can put one model instance on fused kernels (`set_ops`) without touching the model code or its state_dict.

Convolutions whose output feeds a GroupNorm or a residual add run without their bias, and the bias is added by
that next op (`shift` of GroupNorm, `bias_add` with the residual): the same sum, one pass over the activations
fewer per convolution.
"""

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.models.cross_attention_kv import keys_values_of
from diffrt.models.joint_linear import JointLinear
from diffrt.models.ops import TORCH_OPS


class GroupNorm(nn.GroupNorm):
    """GroupNorm with an optional SiLU after it, so that a fused kernel can do both in one pass; `shift` ([C] or
    [N, C]) is added to x first (the bias of the convolution before it, the time embedding)."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.silu = silu

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, shift)


class Conv2d(nn.Conv2d):
    """nn.Conv2d through `ops.conv2d` (on the kernels its bias is one vectorised pass; torch's own bias add on a
    channels-last output is not); `unbiased` is the convolution alone, for a caller that adds the bias later."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def unbiased(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# The attribute under which the UNet hands its time embedding's per-block projections, computed in one GEMM
# (ops.joint_time_projections), to the ResNet blocks that read that embedding: {block: its time_emb_proj(silu(temb))}.
TIME_PROJECTIONS = "_diffrt_time_projections"


def time_projection(block: "ResnetBlock2D", temb: torch.Tensor) -> torch.Tensor:
    """block.time_emb_proj(silu(temb)): from the UNet's joint GEMM where it ran, else the block's own."""
    done = temb.__dict__.get(TIME_PROJECTIONS)
    if done is not None and block in done:
        return done[block]
    return block.time_emb_proj(F.silu(temb))


def joint_time_projections(blocks: list["ResnetBlock2D"], joint: JointLinear, temb: torch.Tensor) -> torch.Tensor:
    """temb carrying every block's projection of it, from one SiLU and one GEMM (`joint` over their time_emb_proj)."""
    temb.__dict__[TIME_PROJECTIONS] = dict(zip(blocks, joint(F.silu(temb)), strict=True))
    return temb


# The same blocks' per-channel sums, for all of them in a few passes (ops.joint_block_biases): {block: (what norm2
# adds: its time projection plus conv1's bias, what the closing residual add adds: conv2's bias plus the shortcut's)}.
BLOCK_BIASES = "_diffrt_block_biases"


def joint_block_biases(blocks: list["ResnetBlock2D"], joint: JointLinear, temb: torch.Tensor) -> torch.Tensor:
    """temb carrying every block's two bias sums: one GEMM over all time projections, one add of all conv1 biases
    to it, one add of all shortcut blocks' two biases, where each block would add its own (two tiny launches a block
    in a CUDA graph). The same fp16 sums, element for element; read from the live parameters at every call, so a
    captured graph sees in-place weight changes (LoRA's bias differences)."""
    if any(b.conv1.bias is None or b.conv2.bias is None for b in blocks):
        return joint_time_projections(blocks, joint, temb)
    shifts = joint.unsplit(F.silu(temb)) + torch.cat([b.conv1.bias for b in blocks])
    cut = [b for b in blocks if b.conv_shortcut is not None and b.conv_shortcut.bias is not None]
    sums = {}
    if cut:
        both = torch.cat([b.conv2.bias for b in cut]) + torch.cat([b.conv_shortcut.bias for b in cut])
        sums = dict(zip(cut, both.split([b.conv2.out_channels for b in cut]), strict=True))
    temb.__dict__[BLOCK_BIASES] = {
        b: (shift, sums.get(b)) for b, shift in zip(blocks, shifts.split(joint.sizes, dim=-1), strict=True)
    }
    return temb


def block_biases(block: "ResnetBlock2D", temb: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(what norm2 adds, what the closing residual add adds) for `block`: from the UNet's joint passes where they
    ran, else the block's own sums."""
    done = temb.__dict__.get(BLOCK_BIASES) if temb is not None else None
    shift, bias = done[block] if done is not None and block in done else (None, None)
    if shift is None:
        shift = block.conv1.bias
        if block.time_emb_proj is not None:
            shift = _bias_sum(time_projection(block, temb), shift)
    if bias is None:
        bias = block.conv2.bias
        if block.conv_shortcut is not None:
            bias = _bias_sum(bias, block.conv_shortcut.bias)
    return shift, bias


def _bias_sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional timestep embedding added in between (diffusers' ResnetBlock2D)."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None = 1280,
        groups: int = 32,
        eps: float = 1e-6,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if not self.ops.fold_bias:  # the reference: diffusers' order of operations, rounding for rounding
            h = self.conv1(self.norm1(x))
            if self.time_emb_proj is not None:
                h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = self.conv2(self.norm2(h))
            x = self.conv_shortcut(x) if self.conv_shortcut is not None else x
            return (x + h) / self.output_scale_factor if self.output_scale_factor != 1.0 else x + h
        # conv1's bias and the time embedding are added by norm2, conv2's (and the shortcut's) by the residual add.
        h = self.conv1.unbiased(self.norm1(x))
        shift, bias = block_biases(self, temb)
        h = self.conv2.unbiased(self.norm2(h, shift))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut.unbiased(x)
        if self.ops.group_stats:  # the output's statistics for the next GroupNorm (the next block's norm1)
            return self.ops.bias_add_stats(h, bias, x, 1.0 / self.output_scale_factor, self.norm2.num_groups)
        return self.ops.bias_add(h, bias, x, 1.0 / self.output_scale_factor)


class Attention(nn.Module):
    """Multi-head attention over token sequences [B, S, C]; self-attention when `context` is None."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])
        # With ops.fuse_projections: q, k, v in one GEMM (self-attention), or k and v (cross-attention: q reads x)
        self._qkv = JointLinear(self.to_q, self.to_k, self.to_v)
        self._kv = JointLinear(self.to_k, self.to_v)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """residual: [B, S, query_dim] holding the output projection's bias already, added in its GEMM (in place)."""
        b, h = x.shape[0], self.heads
        projected = keys_values_of(self, context) if self.ops.joint_cross_attention and context is not None else None
        if projected is not None:  # the UNet's one GEMM over every cross-attention (diffrt.models.cross_attention_kv)
            q, (k, v) = self.to_q(x), projected
        elif not self.ops.fuse_projections:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        elif context is None:
            q, k, v = self._qkv(x)
        else:
            q, (k, v) = self.to_q(x), self._kv(context)
        # [B, S, H*D] -> [B, H, S, D] as strided views (of the joint GEMM's output too): the attention kernels take
        # any strides, so no copy.
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
        out = self.ops.attention(q, k, v).transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out[0](out) if residual is None else add_linear(out, self.to_out[0], residual)


class SpatialSelfAttention(Attention):
    """The VAE's single-head attention over an image [B, C, H, W]: GroupNorm, attention, residual add."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        out = super().forward(tokens)
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class GEGLU(nn.Module):
    """Gated GELU projection, Shazeer 2020 (https://arxiv.org/abs/2002.05202)."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops.geglu_linear is not None:  # the projection and the gate in one GEMM (ops.geglu_linear)
            return self.ops.geglu_linear(x, self.proj.weight, self.proj.bias)
        return self.ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: as Attention.forward's."""
        h = self.net[0](x)
        return self.net[2](h) if residual is None else add_linear(h, self.net[2], residual)


def add_linear(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ linear.weight^T, with the residual as the GEMM's C matrix (cuBLAS adds it in its epilogue),
    written into `residual` (contiguous, which already holds linear's bias): no separate add kernel."""
    out = residual.view(-1, residual.shape[-1])
    torch.addmm(out, x.reshape(-1, x.shape[-1]), linear.weight.t(), out=out)
    return residual


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward, each with a residual."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads, dim_head=dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not self.ops.fuse_residuals:
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x), context)
            return x + self.ff(self.norm3(x))
        # Each LayerNorm also writes x + the bias of its sublayer's output projection, whose GEMM then adds the
        # sublayer's output to it in place: the same sums with no add kernel over the activation.
        h, r = self._norm(self.norm1, x, self.attn1.to_out[0].bias)
        x = self.attn1(h, residual=r)
        h, r = self._norm(self.norm2, x, self.attn2.to_out[0].bias)
        x = self.attn2(h, context, residual=r)
        h, r = self._norm(self.norm3, x, self.ff.net[2].bias)
        return self.ff(h, residual=r)

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor, add: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.layer_norm(x, norm.weight, norm.bias, norm.eps, add)


class Transformer2DModel(nn.Module):
    """GroupNorm, project into tokens, `depth` transformer blocks, project back, residual (diffusers' names)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        depth: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        # SD1.x projects with 1x1 convolutions, SD2.x/SDXL with linear layers: same maths, different weight shapes.
        proj = nn.Linear if use_linear_projection else (lambda i, o: Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        ops = self.norm.ops
        fused = ops.group_norm_plus is not None and ops.fold_bias and self.proj_out.bias is not None
        if fused and x.is_contiguous(memory_format=torch.channels_last):
            return self._with_residual_in_the_gemm(x, context)
        h = self._blocks(self.norm(x), context)
        if self.use_linear_projection:
            return x + self.proj_out(h).transpose(1, 2).reshape(b, c, hgt, wid)
        h = h.transpose(1, 2).reshape(b, -1, hgt, wid)
        if not self.proj_out.ops.fold_bias:
            return x + self.proj_out(h)
        return self.proj_out.ops.bias_add(self.proj_out.unbiased(h), self.proj_out.bias, x)

    def _blocks(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The normalised [N, C, H, W] input projected into tokens [N, H*W, inner] and through the blocks."""
        if self.use_linear_projection:
            h = self.proj_in(h.flatten(2).transpose(1, 2))
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        return h

    def _with_residual_in_the_gemm(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """forward, with the norm also writing r = x + proj_out's bias and proj_out's GEMM adding its product to r in
        place: channels-last x is [N, H*W, C] in memory, the projection's tokens (a 1x1 convolution's too)."""
        c = x.shape[1]
        norm = self.norm
        h, r = norm.ops.group_norm_plus(x, norm.num_groups, norm.weight, norm.bias, norm.eps, self.proj_out.bias)
        h = self._blocks(h, context)
        out = r.permute(0, 2, 3, 1).view(-1, c)  # r has x's channels-last strides
        torch.addmm(out, h.reshape(-1, h.shape[-1]), self.proj_out.weight.view(c, -1).t(), out=out)
        return r


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution. The VAE encoder pads (0, 1, 0, 1) by hand instead of padding 1 (padding=0)."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.ops.upsample_conv is not None and size is None:  # both at x's resolution (ops.upsample_conv)
            return self.ops.upsample_conv(x, self.conv)
        return self.conv(self.ops.upsample_nearest(x, size))
