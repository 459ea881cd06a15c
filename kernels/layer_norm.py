"""LayerNorm over the last dimension in Triton, optionally also writing x + a per-channel vector (the residual the
next projection's GEMM adds in its epilogue).

A transformer block's sublayer is `x + proj(f(layer_norm(x)))`: torch runs the LayerNorm, the projection's GEMM
with its bias, and the residual add as a third kernel over the whole activation. Here the LayerNorm kernel also
writes r = x + proj.bias, and the projection's GEMM adds r as its C matrix (torch.addmm(r, a, W^T, out=r), in place),
so the add kernel and one pass over the activation are gone (diffrt.models.layers.BasicTransformerBlock). The
statistics are fp32 two-pass over the row held in registers: the exact mean first, then the variance about it.
"""

import torch
import triton
import triton.language as tl

from diffrt.kernels._autotune import autotune as _autotune
from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

_CONFIGS = [
    triton.Config({"BLOCK_M": 1}, num_warps=4),
    triton.Config({"BLOCK_M": 2}, num_warps=4),
    triton.Config({"BLOCK_M": 4}, num_warps=8),
    triton.Config({"BLOCK_M": 8}, num_warps=8),
]


def _prune(configs, args):
    # A tile of more than 8K fp32 values spills registers (the GroupNorm kernels' limit, benchmarks/NOTES_kernels.md).
    return [c for c in configs if c.kwargs["BLOCK_M"] * args["BLOCK_C"] <= 8192] or configs[:1]


@_autotune(_CONFIGS, key=["M", "C", "HAS_ADD"], prune=_prune)
@triton.jit
def _layer_norm_kernel(
    X,  # [M, C] input, rows `sx` apart, channels contiguous
    W,  # [C] weight
    B,  # [C] bias
    ADD,  # [C] vector added to x for SUM, or W when unused
    Y,  # [M, C] normalised output, contiguous
    SUM,  # [M, C] x + ADD out, contiguous, or Y when unused
    M,  # rows
    C,  # channels
    sx,  # x's row stride
    eps,  # added to the variance
    HAS_ADD: tl.constexpr,  # whether SUM is written
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # power of two >= C: a whole row per program row
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < M)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    tl.store(Y + offs, (d * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty), mask=mask)
    if HAS_ADD:
        add = tl.load(ADD + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(SUM + offs, (x + add[None, :]).to(SUM.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> int | None:
    """The row stride of x seen as [M, C] without a copy (channels contiguous, rows evenly spaced), or None."""
    if x.dim() < 1 or x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1]).stride(0) if x.numel() else x.shape[-1]
    except RuntimeError:  # the leading dims do not collapse into one stride
        return None


def supports(x: torch.Tensor) -> bool:
    """Whether layer_norm can read x without a copy: channels contiguous, the leading dims one stride."""
    return _rows(x) is not None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    add: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """F.layer_norm(x, (C,), weight, bias, eps) over the last dimension C, contiguous, in x's dtype; with `add` [C]
    also x + add, as (y, x + add). fp32 arithmetic. out: the contiguous tensor(s) to write instead of new ones."""
    sx = _rows(x)
    if sx is None:
        raise ValueError(f"layer_norm reads [..., C] tensors with contiguous channels, got strides {x.stride()}")
    c = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias), ("add", add)):
        if p is not None and (p.shape != (c,) or p.device != x.device):
            raise ValueError(f"{name} must have shape ({c},) on {x.device}, got {tuple(p.shape)} on {p.device}")
    outs = out or tuple(torch.empty(x.shape, device=x.device, dtype=x.dtype) for _ in range(1 + (add is not None)))
    if len(outs) != 1 + (add is not None) or any(
        o.shape != x.shape or o.dtype != x.dtype or not o.is_contiguous() for o in outs
    ):
        raise ValueError(f"out must be {1 + (add is not None)} contiguous {tuple(x.shape)} {x.dtype} tensor(s)")
    y, total = outs[0], outs[-1]
    m = x.numel() // c if c else 0
    if m:
        block_c = triton.next_power_of_2(c)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]),)

        _layer_norm_kernel[grid](x, weight, bias, add if add is not None else weight, y, total, m, c, sx, float(eps),
                                 HAS_ADD=add is not None, BLOCK_C=block_c, **launch_options(x.device))  # fmt: skip
    return (y, total) if add is not None else y


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, add: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, in x's dtype: the tests' reference (on fp32 copies) and the torch ops' implementation."""
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return (y, x + add) if add is not None else y
