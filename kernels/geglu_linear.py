"""GEGLU's projection and gate in one Triton GEMM: y = (x W_h^T + b_h) * gelu(x W_g^T + b_g), where [W_h; W_g] is
the projection's weight (h rows first, as torch.chunk splits its output; Shazeer 2020,
https://arxiv.org/abs/2002.05202), with the exact erf GELU that diffusers' GEGLU uses.

On the fast path the projection is a cuBLAS GEMM that writes [M, 2D] and the gate kernel (kernels/geglu.py) reads it
back to write [M, D]. Here each program accumulates its tile of h and the matching tile of the gate side by side and
applies the gate in its epilogue, so the [M, 2D] product is never stored: at 512² on SD2.1's UNet that is ~380 MB of
traffic and 16 launches a step (benchmarks/NOTES_kernels.md, run 16). h and the gate stay in fp32 until the product,
where the two-pass path rounds both to half first. Whether Triton's GEMM here is as fast as cuBLAS's is what the
ablation decides ("+ GEGLU in its GEMM"); it is off on the fast path until then.
"""

import torch
import triton
import triton.language as tl

from diffrt.kernels._autotune import INTERPRET as _INTERPRET
from diffrt.kernels._autotune import autotune as _autotune
from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

# BLOCK_N columns of h and BLOCK_N of the gate per program: two fp32 accumulators, so the tiles are half as wide as
# a plain GEMM's at the same register budget. The first config is the interpreter's (CPU tests).
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=5),
]
DTYPES = (torch.float16, torch.bfloat16)


@_autotune(_CONFIGS, key=["M", "D", "K"])
@triton.jit
def _geglu_linear_kernel(
    X,  # [M, K] activations, rows contiguous
    WH,  # [D, K] the projection's weight's first D rows (nn.Linear layout): h's
    WG,  # [D, K] its last D rows: the gate's
    B,  # [2 * D] its bias
    Y,  # [M, D] output, rows contiguous
    M,
    D,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks that take their turns over the columns together (their W tiles stay in L2)
    DOT_FP32: tl.constexpr,  # upcast the dot's operands (the interpreter's bf16 dot is wrong, as attention's notes)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None].to(tl.int64) * K + ks[None, :]
    wh_ptrs = WH + cols[:, None].to(tl.int64) * K + ks[None, :]  # [BLOCK_N, BLOCK_K] of W_h, rows along K
    wg_ptrs = WG + cols[:, None].to(tl.int64) * K + ks[None, :]
    row_ok, col_ok = rows[:, None] < M, cols[:, None] < D
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        wh = tl.load(wh_ptrs, mask=col_ok & k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=col_ok & k_ok[None, :], other=0.0)
        if DOT_FP32:
            a, wh, wg = a.to(tl.float32), wh.to(tl.float32), wg.to(tl.float32)
        acc_h = tl.dot(a, tl.trans(wh), acc_h)
        acc_g = tl.dot(a, tl.trans(wg), acc_g)
        x_ptrs += BLOCK_K
        wh_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
    h = acc_h + tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    gate = acc_g + tl.load(B + D + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    y = h * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    out_ok = row_ok & (cols[None, :] < D)
    tl.store(Y + rows[:, None].to(tl.int64) * D + cols[None, :], y.to(Y.dtype.element_ty), mask=out_ok)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Half-precision tensors of one dtype, the weight [2D, K] and x's last dim K, both rows contiguous."""
    return (
        bias is not None
        and x.dtype in DTYPES
        and weight.dtype == x.dtype == bias.dtype
        and weight.dim() == 2
        and weight.shape[0] % 2 == 0
        and x.shape[-1] == weight.shape[1]
        and bias.shape == (weight.shape[0],)
        and weight.is_contiguous()
        and bias.is_contiguous()
        and x.stride(-1) == 1
    )


def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h * gelu(gate) for [h | gate] = x @ weight^T + bias; x [..., K], weight [2D, K]; returns [..., D]."""
    if not supports(x, weight, bias):
        raise ValueError(
            f"geglu_linear needs half-precision x [..., K], weight [2D, K] and bias [2D] of one dtype, rows "
            f"contiguous; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, bias "
            f"{None if bias is None else (tuple(bias.shape), bias.dtype)}"
        )
    k, d = weight.shape[1], weight.shape[0] // 2
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], d), device=x.device, dtype=x.dtype)
    if m == 0 or d == 0:
        return y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_N"]),)

    _geglu_linear_kernel[grid](
        x2, weight[:d], weight[d:], bias, y, m, d, k, DOT_FP32=_INTERPRET, **launch_options(x.device)
    )
    return y


def geglu_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain torch, as diffusers' GEGLU computes it (the projection, then the gate): the tests' reference."""
    h, gate = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
    return h * torch.nn.functional.gelu(gate)
