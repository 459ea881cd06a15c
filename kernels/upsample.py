"""Nearest-neighbour 2x upsampling of a channels-last image in Triton: each input pixel's channels written to its
four output pixels.

torch's channels-last nearest upsampling kernel computes a source index per output element: on the H200 profile of
the SD2.1 VAE decoder it ran at about a tenth of memory bandwidth (0.69 ms at 512², 2.99 ms at 1024²;
benchmarks/NOTES_kernels.md, run 8). Here a program reads a [BLOCK_W, BLOCK_C] tile of one input row once, channels
contiguous, and stores it four times.
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
]


@_autotune(_CONFIGS, key=["H", "W", "C"])
@triton.jit
def _upsample_nearest2x_kernel(
    X,  # [N, H, W, C] input (a channels-last [N, C, H, W] tensor's memory)
    Y,  # [N, 2H, 2W, C] output, likewise
    H,  # input height
    W,  # input width
    C,  # channels
    BLOCK_W: tl.constexpr,  # input pixels of one row per program
    BLOCK_C: tl.constexpr,  # channels per program
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    row = tl.program_id(0)  # n * H + h
    ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (ws[:, None] < W) & (cs[None, :] < C)
    x = tl.load(X + (row.to(tl.int64) * W + ws[:, None]) * C + cs[None, :], mask=mask)
    n, h = row // H, row % H
    top = ((n * 2 * H + 2 * h).to(tl.int64) * (2 * W) + 2 * ws[:, None]) * C + cs[None, :]
    below = top + 2 * W * C
    tl.store(Y + top, x, mask=mask)
    tl.store(Y + top + C, x, mask=mask)
    tl.store(Y + below, x, mask=mask)
    tl.store(Y + below + C, x, mask=mask)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W] channels-last -> [N, C, 2H, 2W] channels-last, each pixel repeated 2x2 (F.interpolate's
    nearest mode at scale factor 2)."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"upsample_nearest2x needs a channels-last [N, C, H, W] tensor, got {tuple(x.shape)} "
                         f"strides {x.stride()}")  # fmt: skip
    n, c, h, w = x.shape
    y = torch.empty((n, c, 2 * h, 2 * w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y

    def grid(meta):
        return (n * h, triton.cdiv(w, meta["BLOCK_W"]), triton.cdiv(c, meta["BLOCK_C"]))

    _upsample_nearest2x_kernel[grid](x, y, h, w, c, **launch_options(x.device))
    return y


def upsample_nearest2x_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain torch: the tests' reference and the benchmark's peer."""
    return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
