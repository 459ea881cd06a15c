"""GEGLU's gate in Triton: y = h * gelu(gate) for [h | gate] = the projection's output (Shazeer 2020,
https://arxiv.org/abs/2002.05202), with the exact erf GELU that diffusers' GEGLU uses.

In torch the gate is two kernels over strided halves of the projection (GELU, then the product), both on
TensorIterator's non-vectorised path: 6% of the SD2.1 UNet step at 512² and 8% at 1024² on the H200 profile
(benchmarks/NOTES_kernels.md, run 8). One kernel reads both halves once and writes the product once.
"""

import torch
import triton
import triton.language as tl

from diffrt.kernels._autotune import autotune as _autotune
from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_D": 128}, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 128}, num_warps=8),
    triton.Config({"BLOCK_M": 8, "BLOCK_D": 256}, num_warps=4),
]


@_autotune(_CONFIGS, key=["M", "D"])
@triton.jit
def _geglu_kernel(
    HG,  # [M, 2 * D] projection output, rows contiguous: h in columns [0, D), the gate in [D, 2 * D)
    Y,  # [M, D] output, rows contiguous
    M,  # rows (batch * tokens)
    D,  # output width
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per program
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    src = HG + rows[:, None].to(tl.int64) * (2 * D) + cols[None, :]
    h = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(src + D, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(Y + rows[:, None].to(tl.int64) * D + cols[None, :], (h * gelu).to(Y.dtype.element_ty), mask=mask)


def geglu(hg: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h * gelu(gate) for hg = [..., 2 * D] contiguous (h first, as torch.chunk splits it); returns [..., D]."""
    if not hg.is_contiguous() or hg.dim() < 1 or hg.shape[-1] % 2:
        raise ValueError(f"geglu needs a contiguous [..., 2 * D] tensor, got {tuple(hg.shape)} strides {hg.stride()}")
    d = hg.shape[-1] // 2
    shape = (*hg.shape[:-1], d)
    y = torch.empty(shape, device=hg.device, dtype=hg.dtype) if out is None else out
    if y.shape != shape or y.dtype != hg.dtype or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {hg.dtype} tensor")
    m = hg.numel() // (2 * d) if d else 0
    if m == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]))

    _geglu_kernel[grid](hg, y, m, d, **launch_options(hg.device))
    return y


def geglu_reference(hg: torch.Tensor) -> torch.Tensor:
    """Plain torch, as diffusers' GEGLU computes it: the tests' reference (on fp32 copies) and the benchmark's peer."""
    h, gate = hg.chunk(2, dim=-1)
    return h * torch.nn.functional.gelu(gate)
