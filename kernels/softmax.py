"""Row softmax of fp32 scores, written once in half precision, in Triton.

The VAE's single 512-wide attention head is too wide for the attention kernel, so it runs as fp32 scores from a
batched matrix product, a softmax and a second product (runtime/models/ops.py, attention_wide_heads). In torch the
softmax writes its fp32 probabilities and a cast reads them back to write half ones: at 1024² (scores of 16384 x
16384) that is 0.73 + 0.38 ms of the decode on the H200 profile (benchmarks/NOTES_kernels.md, run 17). One pass reads
the scores and writes the half probabilities, in fp32 arithmetic throughout as torch's softmax on fp32 input.

Rows of up to SINGLE_PASS_MAX_COLUMNS are held in registers and read once; longer rows (the 2048² decode: 65536 keys)
take two passes, the first an online maximum and sum (Milakov & Gimelshein 2018, https://arxiv.org/abs/1805.02867).
"""

import torch
import triton
import triton.language as tl

from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

# Longest row one program holds whole: 16384 fp32 values over 16 warps are 32 registers a thread.
SINGLE_PASS_MAX_COLUMNS = 16384
# Columns per iteration of the two-pass path.
LOOP_BLOCK = 4096
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _softmax_rows_kernel(
    X,  # [R, N] fp32 scores, rows contiguous (row stride sxr)
    Y,  # [R, N] out, rows contiguous (row stride syr)
    sxr,  # score row stride
    syr,  # output row stride
    N,  # columns
    BLOCK_N: tl.constexpr,  # columns per load: the whole row when SINGLE_PASS
    SINGLE_PASS: tl.constexpr,  # the row fits one block
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * sxr
    y_row = Y + row * syr
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_PASS:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=-float("inf"))
        e = tl.exp(x - tl.max(x, 0))
        tl.store(y_row + cols, (e / tl.sum(e, 0)).to(Y.dtype.element_ty), mask=mask)
    else:
        # First pass: a running maximum and the sum of exponentials rescaled to it, per lane, folded at the end.
        m = tl.full([BLOCK_N], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            mask = n0 + cols < N
            x = tl.load(x_row + n0 + cols, mask=mask, other=-float("inf"))
            m_new = tl.maximum(m, x)
            # lanes that have seen only masked columns keep m = -inf: their sum stays 0 (no inf - inf)
            s = tl.where(m_new == -float("inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
            m = m_new
        row_max = tl.max(m, 0)
        total = tl.sum(tl.where(m == -float("inf"), 0.0, s * tl.exp(m - row_max)), 0)
        for n0 in range(0, N, BLOCK_N):
            mask = n0 + cols < N
            x = tl.load(x_row + n0 + cols, mask=mask, other=-float("inf"))
            tl.store(y_row + n0 + cols, (tl.exp(x - row_max) / total).to(Y.dtype.element_ty), mask=mask)


def softmax_rows(scores: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scores, dim=-1) in fp32 arithmetic, returned in `dtype`: fp32 scores [..., N] with contiguous rows
    (the batched matrix product's output). Each row needs at least one finite score (attention's scores always have)."""
    if scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 (the product's fp32 output), got {scores.dtype}")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of {_OUT_DTYPES}, got {dtype}")
    if scores.dim() < 1 or not scores.is_contiguous():
        raise ValueError(f"scores must be a contiguous [..., N] tensor, got {tuple(scores.shape)} {scores.stride()}")
    y = torch.empty(scores.shape, device=scores.device, dtype=dtype) if out is None else out
    if y.shape != scores.shape or y.dtype != dtype or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(scores.shape)} {dtype} tensor")
    n = scores.shape[-1]
    rows = scores.numel() // n if n else 0
    if rows == 0:
        return y
    single = n <= SINGLE_PASS_MAX_COLUMNS
    block = triton.next_power_of_2(n) if single else LOOP_BLOCK
    warps = max(1, min(16, block // 1024))  # ~32 fp32 values a thread in the single pass
    _softmax_rows_kernel[(rows,)](scores, y, n, n, n, BLOCK_N=block, SINGLE_PASS=single, num_warps=warps,
                                  **launch_options(scores.device))  # fmt: skip
    return y


def softmax_rows_reference(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel replaces: torch's fp32 softmax, then the cast (the tests' reference and the peer path)."""
    return scores.softmax(-1).to(dtype)
