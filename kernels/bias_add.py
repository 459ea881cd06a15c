"""A convolution's bias epilogue in Triton: y = act((x + bias [+ residual]) * scale) over channels-last activations,
act the identity or ReLU (TAESD's convolutions are each followed by one).

torch adds a cuDNN convolution's bias in a kernel of its own, and for a channels-last output that kernel broadcasts
the [C] bias through TensorIterator's generic (non-vectorised) path: on the H200 profile of the SD2.1 VAE decoder
at 512² those adds took 19% of the decoder's GPU time (benchmarks/NOTES_kernels.md, run 8). A channels-last
[N, C, H, W] tensor is a row-major [N*H*W, C] matrix, so here each program reads a [BLOCK_M, BLOCK_C] tile with the
channels contiguous, adds the bias row (and the ResNet block's residual, which otherwise costs a pass of its own),
and writes once.
"""

import torch
import triton
import triton.language as tl

from diffrt.kernels._autotune import autotune as _autotune
from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 128}, num_warps=8),
    triton.Config({"BLOCK_M": 16, "BLOCK_C": 256}, num_warps=4),
]


# Y may be X (in place): each timed run would add the bias again, so autotuning restores it.
@_autotune(_CONFIGS, key=["M", "C", "HAS_RES", "RELU"], restore=("Y",))
@triton.jit
def _bias_add_kernel(
    X,  # [M, C] input, rows contiguous (a channels-last activation seen as pixels x channels)
    B,  # [C] bias
    R,  # [M, C] residual added as well, or X when unused
    Y,  # [M, C] output (may be X itself: each element is read before it is written)
    M,  # rows (N * H * W)
    C,  # channels
    scale,  # multiplies the sum (1 / the ResNet block's output_scale_factor)
    HAS_RES: tl.constexpr,  # whether R is added
    RELU: tl.constexpr,  # whether max(y, 0) is stored
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # channels per program
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < C)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y += tl.load(B + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    y = y * scale
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t as a [pixels, channels] matrix without a copy, or None when its memory is not laid out that way."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if t.dim() == 2 and t.is_contiguous():
        return t
    return None


def supports(x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether bias_add can read x (and residual) as channels-last rows: 4-D channels-last or 2-D contiguous."""
    return _rows(x) is not None and (residual is None or (residual.shape == x.shape and _rows(residual) is not None))


def bias_add(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None = None,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """(x + bias[c] + residual) * scale for x [N, C, H, W] channels-last (or [M, C] contiguous), then max(., 0) if
    relu; fp32 arithmetic.

    Written into `out` (x's shape and layout; x itself is allowed) or a new tensor in x's layout.
    """
    if not supports(x, residual):
        raise ValueError(
            f"bias_add reads channels-last [N, C, H, W] or contiguous [M, C] tensors (residual of the same shape and "
            f"layout); got x {tuple(x.shape)} strides {x.stride()}"
            + ("" if residual is None else f", residual {tuple(residual.shape)} strides {residual.stride()}")
        )
    c = x.shape[1]
    if bias.shape != (c,) or bias.device != x.device:
        raise ValueError(f"bias must have shape ({c},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    y = torch.empty_like(x) if out is None else out
    if y.shape != x.shape or _rows(y) is None or y.dtype != x.dtype:
        raise ValueError(f"out must have x's shape {tuple(x.shape)}, dtype and layout")
    x2, y2 = _rows(x), _rows(y)
    r2 = _rows(residual) if residual is not None else x2
    m = x2.shape[0]
    if m == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))

    _bias_add_kernel[grid](x2, bias, r2, y2, m, c, float(scale), HAS_RES=residual is not None, RELU=bool(relu),
                           **launch_options(x.device))  # fmt: skip
    return y


def bias_add_reference(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None, scale: float = 1.0, relu: bool = False
) -> torch.Tensor:
    """Plain torch, in x's dtype: the tests' reference (on fp32 copies) and the benchmark's peer."""
    y = x + bias.view(-1, *[1] * (x.dim() - 2))
    if residual is not None:
        y = residual + y
    y = y if scale == 1.0 else y * scale
    return torch.relu(y) if relu else y
