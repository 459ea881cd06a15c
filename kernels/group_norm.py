"""GroupNorm (Wu & He 2018) with an optional pre-norm add and an optional fused SiLU, in Triton.

y = silu?(group_norm(x + residual?)) for x of shape [N, C, *spatial] in NCHW or channels-last memory format, read
through its strides (no permute copies). Statistics are fp32 and combined with Chan et al.'s parallel variance
formula (https://en.wikipedia.org/wiki/Algorithms_for_calculating_variance#Parallel_algorithm): every block's
mean and M2 come from a two-pass over registers, so large means and large variances do not cancel.

Two algorithms:
- "fused": one program per (sample, group); it reads the group once for the statistics and again (from L1/L2) to
  normalise. One launch: best for small groups, where launch latency dominates.
- "split": the SD VAE and the 1024² UNet have groups of up to millions of elements and only 32 groups per image,
  so the reduction is split over the spatial axis: a stats kernel writes per-channel partial (mean, M2) for each
  spatial chunk, a finalize kernel folds them into per-channel scale/shift, and an apply kernel normalises. The
  grid fills the SMs at batch 1; the apply kernel walks memory backwards so it starts on what the stats kernel
  left in L2.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diffrt.kernels._autotune import INTERPRET as _INTERPRET
from diffrt.kernels._autotune import autotune as _autotune
from diffrt.kernels.bias_add import bias_add, bias_add_reference
from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

# Above this many elements per group the "split" algorithm is used (see _choose_algorithm).
FUSED_MAX_GROUP_ELEMENTS = 16384
# Fewest spatial positions one stats program reduces (channels-last: half of it), and the most spatial chunks per
# sample for NCHW and channels-last (benchmarks/NOTES_kernels.md, runs 3-4).
MIN_SPLIT_ROWS = 128
MAX_SPLITS_NCHW = 64
MAX_SPLITS_NHWC = 512
# Partial statistics the finalize kernel folds per iteration.
FINALIZE_BLOCK = 64


def _cfg(num_warps, **blocks):
    return triton.Config(blocks, num_warps=num_warps)


# Tiles are [BLOCK_S, BLOCK_C]. NCHW wants long contiguous spatial runs, channels-last wants wide channel runs.
_FUSED_CONFIGS = [_cfg(4, BLOCK_S=64), _cfg(8, BLOCK_S=128), _cfg(4, BLOCK_S=256)]
_NCHW_CONFIGS = [_cfg(4, BLOCK_S=256, BLOCK_C=8), _cfg(8, BLOCK_S=512, BLOCK_C=8), _cfg(4, BLOCK_S=128, BLOCK_C=16)]
_NHWC_CONFIGS = [_cfg(4, BLOCK_S=16, BLOCK_C=128), _cfg(8, BLOCK_S=32, BLOCK_C=128), _cfg(4, BLOCK_S=8, BLOCK_C=256)]


def _prune_fused(configs, args):
    # Tiles of more than 8K fp32 values spilled registers in the sm_90 compile (benchmarks/NOTES_kernels.md).
    block_c = triton.next_power_of_2(args["CG"])
    return [c for c in configs if c.kwargs["BLOCK_S"] * block_c <= 8192] or configs[:1]


def _prune_by_layout(configs, args):
    # Channels-last tensors have a channel stride of 1; pick the tile family that reads them contiguously.
    family = _NHWC_CONFIGS if args["sxc"] == 1 else _NCHW_CONFIGS
    return [c for c in configs if c in family] or configs[:1]


@_autotune(_FUSED_CONFIGS, key=["C", "S", "CG", "sxc"], prune=_prune_fused)
@triton.jit
def _group_norm_fused_kernel(
    X,  # [N, C, S] input; strides (sxn, sxc, sxs) cover NCHW (sxs == 1) and channels-last (sxc == 1)
    R,  # [N, C, S] residual added before the norm (strides may be 0 to broadcast), or X when unused
    Y,  # [N, C, S] output, strides (syn, syc, sys)
    HSUM,  # [N, C, S] x + residual (+ plus) written when WRITE_SUM (same strides as Y), else Y
    PLUS,  # [C] added to what HSUM stores but not normalised (HAS_PLUS), or X when unused
    W,  # [C] weight, or X when unused
    B,  # [C] bias, or X when unused
    sxn,  # x sample stride
    sxc,  # x channel stride
    sxs,  # x spatial stride
    srn,  # residual sample stride
    src,  # residual channel stride
    srs,  # residual spatial stride
    syn,  # y sample stride
    syc,  # y channel stride
    sys,  # y spatial stride
    C,  # channels
    S,  # spatial size (H * W)
    G,  # groups
    CG,  # channels per group (C // G)
    eps,  # added to the variance
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    HAS_RES: tl.constexpr,  # residual given
    WRITE_SUM: tl.constexpr,  # also store x + residual
    HAS_PLUS: tl.constexpr,  # the stored sum also adds PLUS
    SILU: tl.constexpr,  # fuse SiLU
    BLOCK_C: tl.constexpr,  # power of two >= CG
    BLOCK_S: tl.constexpr,  # spatial positions per tile
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cl = tl.arange(0, BLOCK_C)
    c = g * CG + cl
    c_ok = cl < CG
    rows = tl.arange(0, BLOCK_S)
    x_base = X + n.to(tl.int64) * sxn
    r_base = R + n.to(tl.int64) * srn

    count = 0.0
    mean = 0.0
    m2 = 0.0
    for s0 in range(0, S, BLOCK_S):
        s = s0 + rows
        mask = (s < S)[:, None] & c_ok[None, :]
        h = tl.load(x_base + s[:, None] * sxs + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(r_base + s[:, None] * srs + c[None, :] * src, mask=mask, other=0.0).to(tl.float32)
        nb = (tl.minimum(S - s0, BLOCK_S) * CG).to(tl.float32)
        mb = tl.sum(h) / nb
        d = tl.where(mask, h - mb, 0.0)
        m2b = tl.sum(d * d)
        # Chan, Golub & LeVeque (1979) pairwise update: exact for any mean offset, no sum-of-squares cancellation.
        tot = count + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (count * nb / tot)
        count = tot

    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    scale = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        scale = tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], tl.float32)
    if HAS_B:
        shift = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = scale * rstd
    shift = shift - mean * scale
    plus = tl.zeros([BLOCK_C], tl.float32)
    if HAS_PLUS:
        plus = tl.load(PLUS + c, mask=c_ok, other=0.0).to(tl.float32)

    y_base = Y + n.to(tl.int64) * syn
    hs_base = HSUM + n.to(tl.int64) * syn
    for s0 in range(0, S, BLOCK_S):
        s = s0 + rows
        mask = (s < S)[:, None] & c_ok[None, :]
        h = tl.load(x_base + s[:, None] * sxs + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(r_base + s[:, None] * srs + c[None, :] * src, mask=mask, other=0.0).to(tl.float32)
        y = h * scale[None, :] + shift[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        offs = s[:, None] * sys + c[None, :] * syc
        tl.store(y_base + offs, y.to(Y.dtype.element_ty), mask=mask)
        if WRITE_SUM:
            if HAS_PLUS:
                h += plus[None, :]
            tl.store(hs_base + offs, h.to(HSUM.dtype.element_ty), mask=mask)


# With WRITE_H the kernel writes h into H, which may be X itself (in place): autotuning restores it between runs.
@_autotune(_NCHW_CONFIGS + _NHWC_CONFIGS, key=["C", "S", "SPLIT", "sxc", "WRITE_H"], prune=_prune_by_layout,
           restore=("H",))  # fmt: skip
@triton.jit
def _group_norm_stats_kernel(
    X,  # [N, C, S] input (strides as in the fused kernel)
    R,  # [N, C, S] residual, or X when unused
    PMEAN,  # [N, SPLIT, C] fp32 out: per-channel mean of each spatial chunk
    PM2,  # [N, SPLIT, C] fp32 out: per-channel sum of squared deviations of each chunk
    BIAS,  # [C] added to x with the residual when WRITE_H, or X when unused
    H,  # [N, C, S] out when WRITE_H: h = (x + residual + bias) * scale, x's strides; else X
    sxn,  # x sample stride
    sxc,  # x channel stride
    sxs,  # x spatial stride
    srn,  # residual sample stride
    src,  # residual channel stride
    srs,  # residual spatial stride
    C,  # channels
    S,  # spatial size
    SPLIT,  # spatial chunks per sample
    CHUNK,  # spatial positions per chunk (the last one may be shorter)
    scale,  # multiplies h when WRITE_H
    HAS_RES: tl.constexpr,  # residual given
    C_INNER: tl.constexpr,  # channels-last memory order
    WRITE_H: tl.constexpr,  # the producer's epilogue: add the bias, scale, store h, and take h's statistics
    BLOCK_S: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per program
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    num_c = (C + BLOCK_C - 1) // BLOCK_C
    if C_INNER:  # channels-last: channel blocks vary fastest, so the linear id follows memory order
        cb = pid % num_c
        sp = (pid // num_c) % SPLIT
        n = pid // (num_c * SPLIT)
    else:
        sp = pid % SPLIT
        cb = (pid // SPLIT) % num_c
        n = pid // (SPLIT * num_c)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    rows = tl.arange(0, BLOCK_S)
    x_base = X + n.to(tl.int64) * sxn
    r_base = R + n.to(tl.int64) * srn
    start = sp * CHUNK
    end = tl.minimum(S, start + CHUNK)
    bias = tl.zeros([BLOCK_C], tl.float32)
    if WRITE_H:
        bias = tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)

    if C_INNER:
        # Channels-last tiles [rows, channels] would need a cross-warp (shared-memory) reduction over rows every
        # iteration; instead keep a Welford (1962) state per tile element and fold the rows once at the end (Chan).
        n_row = tl.zeros([BLOCK_S], tl.float32)
        mean = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + rows
            row_ok = s < end
            mask = row_ok[:, None] & c_ok[None, :]
            offs = s[:, None] * sxs + c[None, :] * sxc
            h = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(r_base + s[:, None] * srs + c[None, :] * src, mask=mask, other=0.0).to(tl.float32)
            if WRITE_H:  # the statistics of h as stored, rounded to its dtype, which is what a GroupNorm reads
                h = ((h + bias[None, :]) * scale).to(H.dtype.element_ty)
                tl.store(H + n.to(tl.int64) * sxn + offs, h, mask=mask)
                h = h.to(tl.float32)
            n_row += row_ok.to(tl.float32)
            inv = 1.0 / tl.maximum(n_row, 1.0)
            delta = tl.where(mask, h - mean, 0.0)
            mean += delta * inv[:, None]
            m2 += delta * (h - mean)
        count = tl.sum(n_row, 0)
        mean_c = tl.sum(mean * n_row[:, None], 0) / count
        d = mean - mean_c[None, :]
        m2_c = tl.sum(m2, 0) + tl.sum(d * d * n_row[:, None], 0)
    else:
        # NCHW tiles reduce along their contiguous axis (within a warp): fold each tile's exact mean and M2 into
        # the running ones (Chan, Golub & LeVeque 1979: no sum-of-squares cancellation).
        count = 0.0
        mean_c = tl.zeros([BLOCK_C], tl.float32)
        m2_c = tl.zeros([BLOCK_C], tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + rows
            mask = (s < end)[:, None] & c_ok[None, :]
            offs = s[:, None] * sxs + c[None, :] * sxc
            h = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(r_base + s[:, None] * srs + c[None, :] * src, mask=mask, other=0.0).to(tl.float32)
            if WRITE_H:
                h = ((h + bias[None, :]) * scale).to(H.dtype.element_ty)
                tl.store(H + n.to(tl.int64) * sxn + offs, h, mask=mask)
                h = tl.where(mask, h.to(tl.float32), 0.0)
            nb = tl.minimum(end - s0, BLOCK_S).to(tl.float32)
            mb = tl.sum(h, 0) / nb
            d = tl.where(mask, h - mb[None, :], 0.0)
            m2b = tl.sum(d * d, 0)
            tot = count + nb
            delta = mb - mean_c
            mean_c = mean_c + delta * (nb / tot)
            m2_c = m2_c + m2b + delta * delta * (count * nb / tot)
            count = tot

    out = (n * SPLIT + sp).to(tl.int64) * C + c
    tl.store(PMEAN + out, mean_c, mask=c_ok)
    tl.store(PM2 + out, m2_c, mask=c_ok)


@triton.jit
def _group_norm_finalize_kernel(
    PMEAN,  # [N, SPLIT, C] fp32 per-chunk channel means
    PM2,  # [N, SPLIT, C] fp32 per-chunk channel M2
    W,  # [C] weight, or PMEAN when unused
    B,  # [C] bias, or PMEAN when unused
    SCALE,  # [N, C] fp32 out: rstd * weight
    SHIFT,  # [N, C] fp32 out: bias - mean * rstd * weight
    C,  # channels
    S,  # spatial size
    G,  # groups
    CG,  # channels per group
    SPLIT,  # chunks per sample
    CHUNK,  # spatial positions per chunk
    total,  # CG * S as a float: elements per group
    eps,  # added to the variance
    HAS_W: tl.constexpr,  # weight given
    HAS_B: tl.constexpr,  # bias given
    BLOCK_SPLIT: tl.constexpr,  # chunks folded per iteration
    BLOCK_CG: tl.constexpr,  # power of two >= CG
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    cl = tl.arange(0, BLOCK_CG)
    c = g * CG + cl
    # Two passes over the partials (the group mean first, then M2 about it): exact, and SPLIT may exceed one block.
    acc = tl.zeros([BLOCK_SPLIT, BLOCK_CG], tl.float32)
    for sp0 in range(0, SPLIT, BLOCK_SPLIT):
        sp = sp0 + tl.arange(0, BLOCK_SPLIT)
        mask = (sp < SPLIT)[:, None] & (cl < CG)[None, :]
        offs = (n * SPLIT + sp[:, None]).to(tl.int64) * C + c[None, :]
        cnt = tl.minimum(tl.maximum(S - sp * CHUNK, 0), CHUNK).to(tl.float32)[:, None]
        acc += tl.load(PMEAN + offs, mask=mask, other=0.0) * cnt
    mean = tl.sum(acc) / total
    acc = tl.zeros([BLOCK_SPLIT, BLOCK_CG], tl.float32)
    for sp0 in range(0, SPLIT, BLOCK_SPLIT):
        sp = sp0 + tl.arange(0, BLOCK_SPLIT)
        mask = (sp < SPLIT)[:, None] & (cl < CG)[None, :]
        offs = (n * SPLIT + sp[:, None]).to(tl.int64) * C + c[None, :]
        cnt = tl.minimum(tl.maximum(S - sp * CHUNK, 0), CHUNK).to(tl.float32)[:, None]
        d = tl.where(mask, tl.load(PMEAN + offs, mask=mask, other=0.0) - mean, 0.0)
        acc += tl.load(PM2 + offs, mask=mask, other=0.0) + d * d * cnt
    rstd = 1.0 / tl.sqrt(tl.sum(acc) / total + eps)

    c_ok = cl < CG
    scale = tl.full([BLOCK_CG], 1.0, tl.float32)
    if HAS_W:
        scale = tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_CG], tl.float32)
    if HAS_B:
        shift = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = scale * rstd
    tl.store(SCALE + n * C + c, scale, mask=c_ok)
    tl.store(SHIFT + n * C + c, shift - mean * scale, mask=c_ok)


@_autotune(_NCHW_CONFIGS + _NHWC_CONFIGS, key=["C", "S", "sxc"], prune=_prune_by_layout)
@triton.jit
def _group_norm_apply_kernel(
    X,  # [N, C, S] input
    R,  # [N, C, S] residual, or X when unused
    Y,  # [N, C, S] output
    HSUM,  # [N, C, S] x + residual (+ plus) out when WRITE_SUM, else Y
    PLUS,  # [C] added to what HSUM stores but not normalised (HAS_PLUS), or X when unused
    SCALE,  # [N, C] fp32 per-channel scale
    SHIFT,  # [N, C] fp32 per-channel shift
    sxn,  # x sample stride
    sxc,  # x channel stride
    sxs,  # x spatial stride
    srn,  # residual sample stride
    src,  # residual channel stride
    srs,  # residual spatial stride
    syn,  # y sample stride
    syc,  # y channel stride
    sys,  # y spatial stride
    C,  # channels
    S,  # spatial size
    HAS_RES: tl.constexpr,  # residual given
    WRITE_SUM: tl.constexpr,  # also store x + residual
    HAS_PLUS: tl.constexpr,  # the stored sum also adds PLUS
    SILU: tl.constexpr,  # fuse SiLU
    C_INNER: tl.constexpr,  # channels-last memory order
    BLOCK_S: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    num_s = (S + BLOCK_S - 1) // BLOCK_S
    num_c = (C + BLOCK_C - 1) // BLOCK_C
    # Walk memory backwards: the stats kernel just read it forwards, so its tail is still in L2.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    if C_INNER:  # channels-last: channel blocks vary fastest, so the linear id follows memory order
        cb = pid % num_c
        sb = (pid // num_c) % num_s
        n = pid // (num_c * num_s)
    else:
        sb = pid % num_s
        cb = (pid // num_s) % num_c
        n = pid // (num_s * num_c)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    c_ok = c < C
    mask = (s < S)[:, None] & c_ok[None, :]
    h = tl.load((X + n.to(tl.int64) * sxn) + s[:, None] * sxs + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load((R + n.to(tl.int64) * srn) + s[:, None] * srs + c[None, :] * src, mask=mask, other=0.0).to(
            tl.float32
        )
    scale = tl.load(SCALE + n * C + c, mask=c_ok, other=0.0)
    shift = tl.load(SHIFT + n * C + c, mask=c_ok, other=0.0)
    y = h * scale[None, :] + shift[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    offs = n.to(tl.int64) * syn + s[:, None] * sys + c[None, :] * syc
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if WRITE_SUM:
        if HAS_PLUS:
            h += tl.load(PLUS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(HSUM + offs, h.to(HSUM.dtype.element_ty), mask=mask)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: a few programs are enough to exercise the split path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _choose_algorithm(n: int, c: int, g: int, s: int) -> str:
    # One program per group has only N*G programs (32 at batch 1) but a single launch: worth it while the group
    # is small enough that launch latency, not bandwidth, sets the time.
    return "fused" if (c // g) * s <= FUSED_MAX_GROUP_ELEMENTS else "split"


def _num_splits(n: int, c: int, s: int, channels_last: bool, device: torch.device) -> int:
    if channels_last:
        # One channel block of 128-256 channels per program: enough spatial chunks to cover the SMs ~4 times.
        want = triton.cdiv(4 * _sm_count(device), n * triton.cdiv(c, 128))
        return max(1, min(want, MAX_SPLITS_NHWC, triton.cdiv(s, MIN_SPLIT_ROWS // 2)))
    # NCHW: 8-16-channel blocks already give many programs; this count measured best (run 3 vs run 4).
    want = max(1, 4 * _sm_count(device) // max(1, n * max(1, c // 64)))
    return max(1, min(want, MAX_SPLITS_NCHW, triton.cdiv(s, MIN_SPLIT_ROWS)))


def _partials(n: int, c: int, s: int, channels_last: bool, device: torch.device) -> tuple:
    """(split, chunk, mean, M2 buffers [N, split, C] fp32) of the split path's statistics for this shape."""
    split = _num_splits(n, c, s, channels_last, device)
    chunk = triton.cdiv(s, split)
    split = triton.cdiv(s, chunk)
    pmean = torch.empty((n, split, c), device=device, dtype=torch.float32)
    return split, chunk, pmean, torch.empty_like(pmean)


def _check_inputs(x, num_groups, weight, bias, residual, return_sum, sum_plus=None) -> None:
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    want_device = "cpu" if _INTERPRET else "cuda"
    if x.device.type != want_device:
        raise ValueError(
            f"x is on {x.device}; group_norm runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), "
            f"expected a {want_device} tensor"
        )
    if x.dtype not in allowed:
        raise ValueError(f"x has dtype {x.dtype}; allowed: float32, float16, bfloat16")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, C, *spatial], got {tuple(x.shape)}")
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups != 0:
        divisors = [d for d in (32, 16, 8, 4, 2, 1) if c % d == 0]
        raise ValueError(
            f"num_groups {num_groups} does not divide the {c} channels; use a divisor such as {divisors[0]}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
        if p.dtype not in allowed:
            raise ValueError(f"{name} has dtype {p.dtype}; allowed: float32, float16, bfloat16")
        if p.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},) for {c} channels, got {tuple(p.shape)}")
    if residual is not None:
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")
        per_channel = residual.shape[:2] == x.shape[:2] and all(d == 1 for d in residual.shape[2:])
        if residual.shape != x.shape and not per_channel:
            raise ValueError(
                f"residual must have x's shape {tuple(x.shape)} or be per-channel {tuple(x.shape[:2])} + (1, ...), "
                f"got {tuple(residual.shape)}"
            )
        if return_sum and residual.shape != x.shape:
            raise ValueError("return_sum needs a residual of x's full shape")
    elif return_sum and sum_plus is None:
        raise ValueError("return_sum=True needs a residual or a sum_plus")
    if sum_plus is not None and (
        not return_sum or sum_plus.shape != x.shape[1:2] or sum_plus.dtype != x.dtype or sum_plus.device != x.device
    ):
        raise ValueError(
            f"sum_plus must be a ({x.shape[1]},) {x.dtype} tensor on {x.device} with return_sum=True, got "
            f"{tuple(sum_plus.shape)} {sum_plus.dtype} on {sum_plus.device}, return_sum={return_sum}"
        )


def _flat_strides(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(sample, channel, spatial) strides of t viewed as [N, C, S]; spatial dims must collapse to one stride."""
    n, c = t.shape[:2]
    try:
        v = t.view(n, c, -1)
    except RuntimeError:
        raise ValueError(
            f"{name}'s spatial dims cannot be read with one stride (shape {tuple(t.shape)}, strides {t.stride()}); "
            f"pass a contiguous or channels_last tensor"
        ) from None
    return v.stride()


@dataclass(frozen=True)
class GroupStats:
    """Per-chunk channel statistics of one tensor as its producer wrote it (`bias_add_with_stats`): what the split
    path's stats kernel would compute, so that group_norm skips that pass over the tensor."""

    pmean: torch.Tensor  # [N, SPLIT, C] fp32
    pm2: torch.Tensor  # [N, SPLIT, C] fp32
    split: int
    chunk: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    data_ptr: int

    def fits(self, x: torch.Tensor) -> bool:
        """Whether these are x's: the same memory, shape and strides (a different tensor never reuses them)."""
        return (x.data_ptr(), tuple(x.shape), x.stride()) == (self.data_ptr, self.shape, self.strides)


def bias_add_with_stats(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    num_groups: int,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GroupStats | None]:
    """h = (x + bias + residual) * scale (fp32 arithmetic, written into `out`, x allowed; else a new tensor in x's
    layout), with h's statistics for a GroupNorm of `num_groups` groups that runs the split path next (None when it
    would run the fused one, whose single pass needs none). One pass of the split path's stats kernel does both."""
    _check_inputs(x, num_groups, None, bias, residual, False)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    h = torch.empty_like(x) if out is None else out
    if h.shape != x.shape or h.dtype != x.dtype or h.stride() != x.stride():
        raise ValueError(f"out must have x's shape {tuple(x.shape)}, dtype and strides")
    n, c = x.shape[:2]
    s = x[0, 0].numel() if x.numel() else 0
    sx = _flat_strides(x, "x")
    sr = _flat_strides(residual, "residual") if residual is not None else (0, 0, 0)
    if _choose_algorithm(n, c, num_groups, s) == "fused" or not x.numel():
        if not x.numel():
            return h, None
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return bias_add(x, bias, residual, scale, out=h), None
        return h.copy_(bias_add_reference(x, bias, residual, scale)), None
    c_inner = sx[1] == 1
    split, chunk, pmean, pm2 = _partials(n, c, s, c_inner, x.device)

    def grid(meta):
        return (n * split * triton.cdiv(c, meta["BLOCK_C"]),)

    _group_norm_stats_kernel[grid](
        x, residual if residual is not None else x, pmean, pm2, bias, h, *sx, *sr, c, s, split, chunk, float(scale),
        HAS_RES=residual is not None, C_INNER=c_inner, WRITE_H=True, **launch_options(x.device),
    )  # fmt: skip
    return h, GroupStats(pmean, pm2, split, chunk, tuple(h.shape), h.stride(), h.data_ptr())


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    silu: bool = False,
    residual: torch.Tensor | None = None,
    return_sum: bool = False,
    algorithm: str = "auto",
    out: torch.Tensor | None = None,
    stats: GroupStats | None = None,
    sum_plus: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """silu?(group_norm(x + residual?)), same shape, dtype and memory format as x (or written into `out`).

    residual has x's shape, or is per-channel ([N, C, 1, 1], e.g. the ResNet block's time embedding). With
    return_sum=True the kernel also writes x + residual and returns (y, x + residual); sum_plus ([C], x's dtype)
    is added to that sum but not normalised (the Transformer2D's output projection bias, for its residual GEMM's C
    matrix: the model's Transformer2DModel). algorithm is "auto",
    "fused" or "split" (see the module docstring); the first call per shape autotunes, so call once before
    capturing a CUDA graph. stats: x's statistics from its producer (`bias_add_with_stats`), used by the split path
    in place of its own pass over x when they are x's and there is no residual.
    """
    _check_inputs(x, num_groups, weight, bias, residual, return_sum, sum_plus)
    if algorithm not in ("auto", "fused", "split"):
        raise ValueError(f"algorithm {algorithm!r} is not one of 'auto', 'fused', 'split'")
    n, c = x.shape[:2]
    s = x[0, 0].numel() if x.numel() else 0
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(
            f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    y = torch.empty_like(x) if out is None else out
    hsum = torch.empty_like(x) if return_sum else y
    if x.numel() == 0:
        return (y, hsum) if return_sum else y
    if c * s >= 2**31:
        raise ValueError(f"one sample has {c * s} elements; at most 2**31 - 1 are supported")
    sx = _flat_strides(x, "x")
    sy = _flat_strides(y, "output")
    if residual is not None:
        r = residual if residual.shape == x.shape else residual.view(n, c, *[1] * (x.dim() - 2)).expand_as(x)
        sr = _flat_strides(r, "residual")
    else:
        r, sr = x, (0, 0, 0)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    pl = sum_plus if sum_plus is not None else x
    flags = {"HAS_RES": residual is not None, "WRITE_SUM": return_sum, "HAS_PLUS": sum_plus is not None, "SILU": silu}
    g = num_groups
    if algorithm == "auto":
        algorithm = _choose_algorithm(n, c, g, s)

    if algorithm == "fused":
        _group_norm_fused_kernel[(n * g,)](
            x, r, y, hsum, pl, w, b, *sx, *sr, *sy, c, s, g, c // g, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=triton.next_power_of_2(c // g), **flags,
            **launch_options(x.device),
        )  # fmt: skip
        return (y, hsum) if return_sum else y

    c_inner = sx[1] == 1
    scale = torch.empty((n, c), device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    if stats is not None and stats.fits(x) and residual is None:  # x's statistics came with it from its producer
        pmean, pm2, split, chunk = stats.pmean, stats.pm2, stats.split, stats.chunk
    else:
        split, chunk, pmean, pm2 = _partials(n, c, s, c_inner, x.device)

        def stats_grid(meta):
            return (n * split * triton.cdiv(c, meta["BLOCK_C"]),)

        _group_norm_stats_kernel[stats_grid](
            x, r, pmean, pm2, x, x, *sx, *sr, c, s, split, chunk, 1.0,
            HAS_RES=residual is not None, C_INNER=c_inner, WRITE_H=False, **launch_options(x.device),
        )  # fmt: skip
    _group_norm_finalize_kernel[(n * g,)](
        pmean, pm2, weight if weight is not None else pmean, bias if bias is not None else pmean, scale, shift,
        c, s, g, c // g, split, chunk, float((c // g) * s), eps,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_SPLIT=min(FINALIZE_BLOCK, triton.next_power_of_2(split)), BLOCK_CG=triton.next_power_of_2(c // g),
        **launch_options(x.device),
    )  # fmt: skip

    def apply_grid(meta):
        return (n * triton.cdiv(s, meta["BLOCK_S"]) * triton.cdiv(c, meta["BLOCK_C"]),)

    _group_norm_apply_kernel[apply_grid](x, r, y, hsum, pl, scale, shift, *sx, *sr, *sy, c, s, C_INNER=c_inner, **flags,
                                         **launch_options(x.device))  # fmt: skip
    return (y, hsum) if return_sum else y


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    silu: bool = False,
    residual: torch.Tensor | None = None,
    return_sum: bool = False,
    sum_plus: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: F.group_norm (+ F.silu), in x's dtype. The tests' reference (on fp32 copies) and the peer."""
    h = x if residual is None else x + residual
    y = F.group_norm(h, num_groups, weight, bias, eps)
    if silu:
        y = F.silu(y)
    if sum_plus is not None:
        h = h + sum_plus.view(1, -1, *[1] * (x.dim() - 2))
    return (y, h) if return_sum else y
