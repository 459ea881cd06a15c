"""Which kernels a model's GroupNorm(+SiLU), attention and elementwise epilogues (a convolution's bias, GEGLU's gate,
nearest upsampling) call: an `Ops` record held by each module that uses one.

Kernel selection is per model instance (`set_ops(model, TRITON_OPS)`), never process state, so two models in one
process (two pipelines, two threads) can run different kernels. Every module starts on `TORCH_OPS`, the reference.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, add: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if add is None else (y, (x + add).contiguous())


def bias_add_torch(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None, scale: float = 1.0,
    relu: bool = False,
) -> torch.Tensor:  # fmt: skip
    y = x if bias is None else x + bias.view(-1, *[1] * (x.dim() - 2))
    if residual is not None:
        y = residual + y
    y = y if scale == 1.0 else y * scale
    return F.relu(y) if relu else y


def bias_add_stats_torch(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, scale: float, num_groups: int
) -> torch.Tensor:
    return bias_add_torch(x, bias, residual, scale)  # torch's GroupNorm takes no statistics


@dataclass(frozen=True)
class Ops:
    """The implementations one model calls; each takes and returns tensors in the layers' own layout."""

    name: str
    # Whether a convolution's bias is added by the op after it (GroupNorm's shift, the residual add) rather than by
    # the convolution: one pass fewer per convolution, the same sum in a different rounding order than diffusers'.
    fold_bias: bool
    # (x [N, C, *], num_groups, weight, bias, eps, silu, shift [C] or [N, C] added to x first, or None) -> like x
    group_norm: Callable[..., torch.Tensor]
    attention: Callable[..., torch.Tensor]  # (q [B, H, Sq, D], k, v [B, H, Sk, D], any strides) -> [B, H, Sq, D]
    # (x [N, C, *], bias [C] or None, residual like x or None, scale, relu=False) -> (x + bias + residual) * scale,
    # then ReLU if relu; it may write into x, so callers pass a tensor of their own (a convolution's fresh output)
    bias_add: Callable[..., torch.Tensor]
    conv2d: Callable[..., torch.Tensor]  # F.conv2d's arguments (x, weight, bias, stride, padding, dilation, groups)
    geglu: Callable[[torch.Tensor], torch.Tensor]  # [..., 2 * D] -> h * gelu(gate), [..., D]
    upsample_nearest: Callable[..., torch.Tensor]  # (x [N, C, H, W], size or None for 2x) -> upsampled x
    # Attention's projections in one GEMM (q, k, v; k, v for cross-attention; diffrt.models.joint_linear) in
    # inference. On in TRITON_OPS, where the H200 measured it (UNet step SDXL 512² -10%, SD2.1 -4%;
    # benchmarks/ablation.py "- fused projections"); off in TORCH_OPS, which keeps diffusers' structure.
    fuse_projections: bool = False
    # TAESD's convolutions with their bias, ReLU and residual in one epilogue (bias_add) and its upsampling on
    # upsample_nearest, as the KL VAE's already are. On in TRITON_OPS (TAESD decode and encode -35..41% on the H200;
    # "- TAESD epilogues").
    taesd_epilogues: bool = False
    # The ResNet block's residual add also takes its output's statistics for the GroupNorm that reads it next
    # (bias_add_stats; kernels/group_norm.py bias_add_with_stats), which then skips its own pass over it. On in
    # TRITON_OPS (VAE decode SD2.1 512² -4.8%, 1024² -2.0% on the H200; benchmarks/ablation.py "- GroupNorm
    # statistics").
    group_stats: bool = False
    # (x, bias, residual, scale, num_groups) -> bias_add's result, carrying its statistics where it can
    bias_add_stats: Callable[..., torch.Tensor] = bias_add_stats_torch
    # (x [..., C], weight, bias, eps, add [C] or None) -> LayerNorm over C, or (that, x + add) with add (contiguous)
    layer_norm: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = layer_norm_torch
    # A transformer block's residual adds in its projections' GEMMs: each LayerNorm also writes x + the next output
    # projection's bias, which that GEMM adds as its C matrix (diffrt.kernels.layer_norm). Off in TORCH_OPS.
    fuse_residuals: bool = False
    # The same in the CLIP text encoders' layers. On in TRITON_OPS (text encoder SD2.1 -12%, SDXL's pair -13% on the
    # H200; benchmarks/ablation.py "- text encoder residuals").
    fuse_text_residuals: bool = False
    # (x [..., K], weight [2D, K], bias [2D]) -> h * gelu(gate) of [h | gate] = x W^T + b, or None: GEGLU's projection
    # and gate in one GEMM (diffrt.kernels.geglu_linear), the [..., 2D] product never stored. Off in TRITON_OPS:
    # slower than cuBLAS's projection and the gate kernel on the H200 (UNet step SD2.1 1024² +1.4%, SDXL 512² +2.0%,
    # 1024² +1.8%; benchmarks/ablation.py "+ GEGLU in its GEMM"); None runs the projection, then `geglu`.
    geglu_linear: Callable[..., torch.Tensor] | None = None
    # (x [N, C, H, W], conv: a 3x3 Conv2d) -> conv(nearest 2x upsampling of x), or None: the upsampling and its
    # convolution as four 2x2 phase convolutions at x's resolution (diffrt.kernels.upsample_conv: 16 multiply-adds
    # per input pixel and channel instead of 36, no upsampled tensor). On in TRITON_OPS (VAE decode -10% at 512² and
    # 1024², SD2.1 and SDXL, TAESD decode -2..4% on the H200; benchmarks/ablation.py "- upsampling in its
    # convolution"); None upsamples, then convolves.
    upsample_conv: Callable[..., torch.Tensor] | None = None
    # The UNet's time-embedding projections (one small GEMM per ResNet block, 22 in SD's UNet, each after a SiLU of
    # its own) as one SiLU and one GEMM per step (diffrt.models.joint_linear over every block's time_emb_proj). On in
    # TRITON_OPS (UNet step -0.08..-0.14 ms, SD2.1 and SDXL at 512² and 1024², on the H200; benchmarks/ablation.py
    # "- time projections in one GEMM").
    joint_time_projections: bool = False
    # With joint_time_projections and folded biases: the ResNet blocks' per-channel bias sums (each block's time
    # projection plus conv1's bias, and for a block with a shortcut conv2's bias plus the shortcut's) as one add each
    # for all blocks of a step instead of one tiny add per block (36 launches in SD's UNet; diffrt.models.layers
    # joint_block_biases). The same fp16 sums. Off in TRITON_OPS until measured (benchmarks/NOTES_kernels.md run 24).
    joint_block_biases: bool = False
    # (x [N, C, H, W], num_groups, weight, bias, eps, plus [C]) -> (group_norm(x), x + plus): the Transformer2D's
    # GroupNorm also writing x + its output projection's bias, which that projection's GEMM then takes as its C
    # matrix (cuBLAS adds it in its epilogue), so the block's outer residual needs no add kernel of its own (16 a
    # step in SD's UNet; diffrt.models.layers.Transformer2DModel). None: the projection, then the add. A candidate,
    # None in TRITON_OPS until measured (benchmarks/NOTES_kernels.md run 25).
    group_norm_plus: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    # Every cross-attention layer's keys and values of the text (16 GEMMs of M = 77 a step in SD's UNet, 70 in
    # SDXL's) as one GEMM, and in a sampler loop once per generation rather than once per step (the denoiser role's
    # `prepare`; diffrt.models.cross_attention_kv). On in TRITON_OPS (H100: UNet step SDXL -0.18..-0.21 ms, SD2.1
    # -0.06..-0.08; SDXL LCM 4 steps -1.4..-1.9 ms end to end; benchmarks/ablation.py "- cross-attention K/V once").
    # Off in TORCH_OPS, which keeps diffusers' structure.
    joint_cross_attention: bool = False
    # SDXL's two text encoders at once, the first on a side stream (also inside a CUDA graph): at 77 tokens each is
    # a chain of small launch-bound GEMMs that leaves most of the GPU idle (diffrt.models.text_conditioning). On in
    # TRITON_OPS (H100: SDXL text encoders 2.13 -> 1.67 ms; "- text encoders side by side").
    concurrent_text_encoders: bool = False


def _per_channel(shift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A shift of [C] or [N, C] as [1 or N, C, 1, ...]: broadcastable against x [N, C, *]."""
    return shift.view(shift.shape[0] if shift.dim() == 2 else 1, -1, *[1] * (x.dim() - 2))


def group_norm_torch(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    silu: bool,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    y = F.group_norm(x if shift is None else x + _per_channel(shift, x), num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def geglu_torch(hg: torch.Tensor) -> torch.Tensor:
    h, gate = hg.chunk(2, dim=-1)
    return h * F.gelu(gate)


def upsample_nearest_torch(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    if size is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=size, mode="nearest")


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


# The Triton kernels take CUDA tensors (fp16/bf16 for attention; fp32/fp16/bf16 for GroupNorm); anything else (CPU
# tensors, fp32 attention, the VAE's single 512-wide head) runs torch's implementation, so choosing these ops never
# changes which inputs work. Under TRITON_INTERPRET=1 the kernels run on CPU tensors through Triton's interpreter
# (how CI tests them).
_KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on") else "cuda"
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # the attention kernel's limit


_EPILOGUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Query rows per chunk of the wide-head attention are chosen so that one chunk's fp32 scores stay under this.
WIDE_HEAD_SCORE_BYTES = 256 << 20
# torch.bmm(..., out_dtype=torch.float32) on half inputs (the aten::bmm.dtype overload, CUDA only) is recent.
_HALF_BMM_TO_FP32 = hasattr(torch.ops.aten.bmm, "dtype")


def _on_kernels(x: torch.Tensor) -> bool:
    return x.device.type == _KERNEL_DEVICE and x.dtype in _EPILOGUE_DTYPES


def group_norm_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    silu: bool,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    if not _on_kernels(x) or (shift is not None and shift.dtype != x.dtype):
        return group_norm_torch(x, num_groups, weight, bias, eps, silu, shift)
    from diffrt.kernels.group_norm import group_norm as kernel  # imported on first use: Triton loads lazily

    # The kernel adds a per-channel residual ([N or 1, C, 1, 1], broadcast by strides) before its statistics.
    residual = None
    if shift is not None:
        residual = _per_channel(shift, x)
        residual = residual.expand(x.shape[0], *residual.shape[1:])
    stats = x.__dict__.pop(_GROUP_STATS, None)  # from bias_add_stats_triton, if x came from there
    return kernel(x, num_groups, weight, bias, eps, silu=silu, residual=residual, stats=stats)


def group_norm_plus_torch(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, plus: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return F.group_norm(x, num_groups, weight, bias, eps), x + _per_channel(plus, x)


def group_norm_plus_triton(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, plus: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _on_kernels(x) or plus.dtype != x.dtype:
        return group_norm_plus_torch(x, num_groups, weight, bias, eps, plus)
    from diffrt.kernels.group_norm import group_norm as kernel

    stats = x.__dict__.pop(_GROUP_STATS, None)  # from bias_add_stats_triton, if x came from there
    return kernel(x, num_groups, weight, bias, eps, return_sum=True, sum_plus=plus, stats=stats)


def bias_add_triton(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None, scale: float = 1.0,
    relu: bool = False,
) -> torch.Tensor:  # fmt: skip
    if bias is None or not _on_kernels(x) or bias.dtype != x.dtype:
        return bias_add_torch(x, bias, residual, scale, relu)
    from diffrt.kernels import bias_add as kernel

    if not kernel.supports(x, residual):
        return bias_add_torch(x, bias, residual, scale, relu)
    return kernel.bias_add(x, bias, residual, scale, out=x, relu=relu)  # a fresh convolution output: in place


# The attribute under which a tensor carries its GroupNorm statistics from its producer to the GroupNorm that reads it
# (group_norm_triton takes them off, so each is used once, and only while the tensor's memory and shape are theirs).
_GROUP_STATS = "_diffrt_group_stats"


def bias_add_stats_triton(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, scale: float, num_groups: int
) -> torch.Tensor:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if bias is None or not (_on_kernels(x) and channels_last and bias.dtype == x.dtype):
        return bias_add_triton(x, bias, residual, scale)
    from diffrt.kernels import bias_add as epilogue
    from diffrt.kernels.group_norm import bias_add_with_stats

    if not epilogue.supports(x, residual):
        return bias_add_triton(x, bias, residual, scale)
    h, stats = bias_add_with_stats(x, bias, residual, num_groups, scale, out=x)  # a fresh convolution output
    if stats is not None:
        setattr(h, _GROUP_STATS, stats)
    return h


def conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *args) -> torch.Tensor:
    # cuDNN writes a channels-last output for a channels-last input, which the bias kernel reads as rows.
    if bias is None or not (_on_kernels(x) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return F.conv2d(x, weight, bias, *args)
    return bias_add_triton(F.conv2d(x, weight, None, *args), bias)


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, add: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    same = all(t is None or t.dtype == x.dtype for t in (weight, bias, add))
    if weight is None or bias is None or not (_on_kernels(x) and same):
        return layer_norm_torch(x, weight, bias, eps, add)
    from diffrt.kernels import layer_norm as kernel

    if not kernel.supports(x):
        return layer_norm_torch(x, weight, bias, eps, add)
    return kernel.layer_norm(x, weight, bias, eps, add)


def geglu_triton(hg: torch.Tensor) -> torch.Tensor:
    if not (_on_kernels(hg) and hg.is_contiguous()):
        return geglu_torch(hg)
    from diffrt.kernels.geglu import geglu as kernel

    return kernel(hg)


def geglu_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _on_kernels(x):
        from diffrt.kernels import geglu_linear as kernel

        if kernel.supports(x, weight, bias):
            return kernel.geglu_linear(x, weight, bias)
    return geglu_triton(F.linear(x, weight, bias))


def upsample_nearest_triton(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    doubling = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
    if not (doubling and _on_kernels(x) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return upsample_nearest_torch(x, size)
    from diffrt.kernels.upsample import upsample_nearest2x as kernel

    return kernel(x)


# The phase convolution has 16 taps of weights where the 3x3 has 9: it pays where the convolution is compute-bound,
# with many input pixels per weight (the VAE decoder's upsamplers: 64x64 and more), not where it is weight-bound (the
# UNet's 8x8 to 32x32), which keep upsample-then-convolve.
UPSAMPLE_CONV_MIN_PIXELS = 64 * 64
_PHASES = "_diffrt_phase_weights"  # a Conv2d's cached phase kernels, with the weight's identity and version


def _phase_weights_of(conv: nn.Conv2d) -> torch.Tensor:
    from diffrt.kernels.upsample_conv import phase_weights

    w = conv.weight
    key = (w.data_ptr(), w._version, w.dtype, w.device)  # in-place changes (a LoRA merged) bump the version
    cached = conv.__dict__.get(_PHASES)
    if cached is None or cached[0] != key:
        # channels-last as the fast path's weights are: cuDNN would convert a contiguous kernel on every call
        cached = (key, phase_weights(w.detach()).contiguous(memory_format=torch.channels_last))
        conv.__dict__[_PHASES] = cached
    return cached[1]


def upsample_conv_triton(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    plain = (conv.stride, conv.padding, conv.dilation, conv.groups) == ((1, 1), (1, 1), (1, 1), 1)
    bias_ok = conv.bias is None or conv.bias.dtype == x.dtype
    pixels = x.shape[0] * x.shape[-2] * x.shape[-1] if x.dim() == 4 else 0
    if plain and bias_ok and _on_kernels(x) and pixels >= UPSAMPLE_CONV_MIN_PIXELS:
        from diffrt.kernels import upsample_conv as kernel  # imported on first use: Triton loads lazily

        if kernel.supports(x, conv.weight):
            return kernel.upsample_conv2x(x, _phase_weights_of(conv), conv.bias)
    return conv(upsample_nearest_triton(x))


def attention_wide_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax: Callable[..., torch.Tensor] | None = None
) -> torch.Tensor:
    """Attention for heads too wide for the kernel (the VAE's one 512-wide head): scores by batched matrix product
    into fp32, softmax in fp32 (torch's, then a cast to q's dtype; or `softmax(scores, dtype)`, which returns the
    probabilities in q's dtype), in query chunks whose scores stay under WIDE_HEAD_SCORE_BYTES.

    torch's SDPA sends a 512-wide head to its memory-efficient kernel, which ran the SD VAE decoder's attention at
    ~150 TFLOP/s on the H200 (3.8 ms at 1024², benchmarks/NOTES_kernels.md, run 8); this way took 2.2 ms off the
    1024² decode and 0.16 ms off the 512² one (run 9's ablation), for an fp32 score matrix of at most 256 MB a chunk.
    """
    b, h, sq, d = q.shape
    sk = k.shape[2]
    q3 = (q * d**-0.5).reshape(b * h, sq, d)
    kt = k.reshape(b * h, sk, d).transpose(1, 2)
    v3 = v.reshape(b * h, sk, d)
    rows = max(1, WIDE_HEAD_SCORE_BYTES // (4 * sk * b * h))
    chunks = []
    for i in range(0, sq, rows):
        qi = q3[:, i : i + rows]
        if q.is_cuda and _HALF_BMM_TO_FP32:  # cuBLAS writes fp32 scores from half inputs: no half rounding
            scores = torch.bmm(qi, kt, out_dtype=torch.float32)
        else:
            scores = torch.bmm(qi, kt).float() if q.is_cuda else torch.bmm(qi.float(), kt.float())
        probs = scores.softmax(-1).to(q.dtype) if softmax is None else softmax(scores, q.dtype)
        chunks.append(torch.bmm(probs, v3))
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
    return out.view(b, h, sq, d)


def attention_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on diffrt's kernels alone: the attention kernel, and for heads too wide for it the batched GEMMs
    around the one-pass softmax."""
    if not (q.device.type == _KERNEL_DEVICE and q.dtype in _ATTENTION_DTYPES):
        return attention_torch(q, k, v)
    if q.shape[-1] > _MAX_HEAD_DIM:
        # The wide heads' fp32 softmax and its cast to half in one Triton pass (the fp32 probabilities are neither
        # written nor read back): VAE decode -0.6..-0.8 ms (-3..-4%) at 1024², -0.05..-0.09 at 512² on the H100
        # (benchmarks/NOTES_kernels.md runs 18 and 19; the ablation's "- wide-head softmax in one pass").
        from diffrt.kernels.softmax import softmax_rows

        return attention_wide_heads(q, k, v, softmax=softmax_rows)
    from diffrt.kernels.attention import attention as kernel

    # The kernel reads [B, S, H, D]; these are views of the same memory, so no copy is made either way.
    return kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# Self-attention over at least this many queries goes to torch's SDPA: cuDNN's warp-specialised Hopper kernel ran
# 7-8% faster than ours at 16384 queries (d 40 and 64) and slower on every 77-key cross-attention
# (benchmarks/NOTES_kernels.md, run 3); 16384 queries are SD's first UNet level at 1024², where it took 1.5-2.0% off
# the step (runs 18 and 19).
SDPA_SELF_ATTENTION_MIN_QUERIES = 16384


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fast path's attention: attention_kernels, with long self-attention (as many keys as queries, at least
    SDPA_SELF_ATTENTION_MIN_QUERIES, heads the kernel takes) on torch's SDPA."""
    sq, d = q.shape[-2], q.shape[-1]
    if sq >= SDPA_SELF_ATTENTION_MIN_QUERIES and k.shape[-2] == sq and d <= _MAX_HEAD_DIM:
        return attention_torch(q, k, v)
    return attention_kernels(q, k, v)


TORCH_OPS = Ops(
    "torch", False, group_norm_torch, attention_torch, bias_add_torch, F.conv2d, geglu_torch, upsample_nearest_torch
)
TRITON_OPS = Ops(
    "triton", True, group_norm_triton, attention_triton, bias_add_triton, conv2d_triton, geglu_triton,
    upsample_nearest_triton, fuse_projections=True, taesd_epilogues=True, bias_add_stats=bias_add_stats_triton,
    layer_norm=layer_norm_triton, fuse_residuals=True, group_stats=True, fuse_text_residuals=True,
    upsample_conv=upsample_conv_triton, joint_time_projections=True, joint_cross_attention=True,
    concurrent_text_encoders=True,
)  # fmt: skip


def set_ops(model: nn.Module, ops: Ops) -> nn.Module:
    """Route every op of an `Ops` record inside `model` (this instance only) through `ops`; returns `model`."""
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), Ops):
            module.ops = ops
    return model


def ops_of(model: nn.Module) -> set[str]:
    """The names of the ops a model's modules use (one name once `set_ops` has run)."""
    return {m.ops.name for m in model.modules() if isinstance(getattr(m, "ops", None), Ops)}
