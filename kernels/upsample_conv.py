"""Nearest 2x upsampling followed by a 3x3 convolution, computed at the input's resolution: four 2x2 convolutions (one
per output phase) in one cuDNN call, then one Triton pass that interleaves the phases and adds the bias.

With U the 2x nearest upsampling, output row 2i + a of conv3x3(U(x)) reads upsampled rows 2i + a - 1 .. 2i + a + 1,
which are input rows {i - 1, i, i} for a = 0 and {i, i, i + 1} for a = 1: a 2x2 window whose taps are the 3x3 kernel's
rows summed where they read the same input row (rows 0 | 1 + 2 for a = 0, 0 + 1 | 2 for a = 1), and the same along
columns. So each of the four phases (a, b) is a 2x2 convolution of x, and all four are one convolution of x with
[4 * C_out, C_in, 2, 2] weights and padding 1, whose output pixel (i + a, j + b) in channel block 2a + b is the output
pixel (2i + a, 2j + b). It is the same sum, to rounding (the summed taps are rounded once to the weight's dtype), in
16 multiply-adds per input pixel and input channel instead of 36, and the 4x upsampled input is never written or
read. The convolution's weights grow from 9 to 16 taps, so this pays where the convolution is compute-bound (many
pixels per weight byte: the VAE decoder's upsamplers) and not where it is weight-bound (the UNet's 8x8 and 16x16).
"""

import torch
import triton
import triton.language as tl

from diffrt.kernels._autotune import autotune as _autotune
from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

_CONFIGS = [
    triton.Config({"BLOCK_W": 16, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_W": 32, "BLOCK_C": 128}, num_warps=8),
    triton.Config({"BLOCK_W": 8, "BLOCK_C": 256}, num_warps=4),
    triton.Config({"BLOCK_W": 64, "BLOCK_C": 64}, num_warps=8),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel [C_out, C_in, 3, 3] as the four 2x2 kernels of its phases, stacked [4 * C_out, C_in, 2, 2] in the
    order (a, b) = (0, 0), (0, 1), (1, 0), (1, 1); summed in fp32 (or wider), returned in the weight's dtype."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"phase_weights needs a [C_out, C_in, 3, 3] kernel, got {tuple(weight.shape)}")
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))

    def rows(k: torch.Tensor, a: int) -> torch.Tensor:  # [.., 3, *] -> [.., 2, *] along dim 2
        first, mid, last = k[:, :, 0:1], k[:, :, 1:2], k[:, :, 2:3]
        return torch.cat([first, mid + last] if a == 0 else [first + mid, last], dim=2)

    def cols(k: torch.Tensor, b: int) -> torch.Tensor:  # the same along dim 3
        first, mid, last = k[..., 0:1], k[..., 1:2], k[..., 2:3]
        return torch.cat([first, mid + last] if b == 0 else [first + mid, last], dim=3)

    phases = [cols(rows(w, a), b) for a in (0, 1) for b in (0, 1)]
    return torch.cat(phases, dim=0).to(weight.dtype).contiguous()


@_autotune(_CONFIGS, key=["H", "W", "C"])
@triton.jit
def _interleave_kernel(
    P,  # [N, H + 1, W + 1, 4 * C] the phase convolution's output (channels-last memory)
    BIAS,  # [C] (unused unless HAS_BIAS)
    Y,  # [N, 2H, 2W, C] output (channels-last memory)
    H,  # input height
    W,  # input width
    C,  # output channels
    HAS_BIAS: tl.constexpr,
    BLOCK_W: tl.constexpr,  # output pixels of one row per program
    BLOCK_C: tl.constexpr,  # channels per program
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    out_row = tl.program_id(0)  # n * 2H + 2i + a
    n, r = out_row // (2 * H), out_row % (2 * H)
    i, a = r // 2, r % 2
    qs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # output columns 2j + b
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j, b = qs // 2, qs % 2
    mask = (qs[:, None] < 2 * W) & (cs[None, :] < C)
    src_pixel = (n * (H + 1) + i + a).to(tl.int64) * (W + 1) + j + b  # [BLOCK_W]
    src = P + src_pixel[:, None] * (4 * C) + ((2 * a + b) * C)[:, None] + cs[None, :]
    y = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + cs, mask=cs < C, other=0.0).to(tl.float32)[None, :]
    dst = Y + (out_row.to(tl.int64) * (2 * W) + qs[:, None]) * C + cs[None, :]
    tl.store(dst, y.to(Y.dtype.element_ty), mask=mask)


def interleave_phases(p: torch.Tensor, bias: torch.Tensor | None, h: int, w: int) -> torch.Tensor:
    """The phase convolution's output p [N, 4C, H + 1, W + 1] (channels-last) as the upsampled convolution's
    [N, C, 2H, 2W] (channels-last), plus bias [C]."""
    shape_ok = p.dim() == 4 and p.shape[1] % 4 == 0 and p.shape[2:] == (h + 1, w + 1)
    if not (shape_ok and p.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"interleave_phases needs a channels-last [N, 4C, {h + 1}, {w + 1}] tensor, got "
                         f"{tuple(p.shape)} strides {p.stride()}")  # fmt: skip
    n, c = p.shape[0], p.shape[1] // 4
    if bias is not None and (bias.shape != (c,) or bias.dtype != p.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{c}] {p.dtype} tensor")
    y = torch.empty((n, c, 2 * h, 2 * w), device=p.device, dtype=p.dtype, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y

    def grid(meta):
        return (n * 2 * h, triton.cdiv(2 * w, meta["BLOCK_W"]), triton.cdiv(c, meta["BLOCK_C"]))

    _interleave_kernel[grid](
        p, p if bias is None else bias, y, h, w, c, HAS_BIAS=bias is not None, **launch_options(p.device)
    )
    return y


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dim() == 4
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and x.is_contiguous(memory_format=torch.channels_last)
        and weight.shape[1] == x.shape[1]
        and weight.shape[-2:] == (3, 3)
    )


def upsample_conv2x(x: torch.Tensor, phases: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_2x(x)) with padding 1 and stride 1, for x [N, C_in, H, W] channels-last and `phases` =
    phase_weights(the 3x3 kernel); returns [N, C_out, 2H, 2W] channels-last."""
    h, w = x.shape[-2:]
    p = torch.nn.functional.conv2d(x, phases, None, 1, 1)  # [N, 4 C_out, H + 1, W + 1], channels-last from cuDNN
    if not p.is_contiguous(memory_format=torch.channels_last):  # a backend that answers in NCHW (the CPU's, say)
        p = p.contiguous(memory_format=torch.channels_last)
    return interleave_phases(p, bias, h, w)


def upsample_conv2x_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain torch, as diffusers' Upsample2D runs it: the tests' reference."""
    up = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    return torch.nn.functional.conv2d(up, weight, bias, 1, 1)
