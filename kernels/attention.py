"""Fused attention forward for the UNet: FlashAttention-style (Dao et al. 2022, https://arxiv.org/abs/2205.14135).

softmax(q k^T * scale) v with an online softmax in fp32 and no materialised score matrix, for q/k/v laid out
[B, S, H, D] with any strides (last one 1), so they can come straight out of a fused QKV projection.

What the UNet needs that a generic kernel does not:
- Cross-attention has 77 keys: when the whole key length fits one block (<= 128 keys), the kernel takes a
  single-block path (one max, one exp, one division; no rescaling loop). Longer prompts (154) use the loop.
- Head dims 40, 80 and 160 (SD 1.x) are not powers of two. Triton tiles are, so the head dim is covered by two
  power-of-two pieces (40 = 32 + 16 with 8 masked, 80 = 64 + 16, 160 = 128 + 32) instead of one padded tile
  (64, 128, 256): 25-60% fewer wasted matrix-unit operations. Autotuning may still pick the single padded tile.
- At head dim 64 a Hopper SM's tensor cores do one key's q.k and p.v for a row in about the time its special-function
  unit takes for that key's exponential (990 TFLOP/s of fp16 products against ~3.9 T exponentials/s), so the
  exponentials bound the kernel as much as the products. `exp2` picks how they are evaluated (EXP2_MODES): all on
  the special-function unit in fp32 ("mufu", the default), two half-precision ones per instruction ("half2"), or
  half of each tile as a polynomial on the FMA units ("split", as FlashAttention-4 does on Blackwell; "poly" for all
  of it). Every mode keeps the scores, the running maximum, the normaliser and the accumulator in fp32; the
  probabilities go into the p.v product in half precision either way.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diffrt.kernels._autotune import INTERPRET as _INTERPRET
from diffrt.kernels._autotune import autotune
from diffrt.kernels.grid_dependency import launch_options, wait_for_predecessor

# Longest key length served by the single-block path (keys padded to a power of two). 77 text tokens fit; at 154
# the loop with 64/128-key blocks wastes less of the padded tile and measured faster (benchmarks/NOTES_kernels.md).
SINGLE_BLOCK_MAX_KEYS = 128

# How the softmax's exponentials are evaluated (the kernel's EXP2_MODE). "half2" needs half-precision operands and a
# GPU (inline PTX): bf16 inputs and the interpreter take "mufu" instead.
EXP2_MODES = {"mufu": 0, "half2": 1, "split": 2, "poly": 3}
EXP2 = "mufu"


def _head_split(head_dim: int, split: bool) -> tuple[int, int]:
    """(D0, D1): power-of-two pieces (>= 16 each, D1 may be 0) covering head_dim."""
    full = max(16, triton.next_power_of_2(head_dim))
    if not split or full == head_dim or full // 2 < 16:
        return full, 0
    d0 = full // 2
    return d0, max(16, triton.next_power_of_2(head_dim - d0))


def _fits(config, args, single: bool) -> bool:
    d0, d1 = _head_split(args["HEAD_DIM"], config.kwargs.get("SPLIT_D", False))
    block_m = config.kwargs["BLOCK_M"]
    block_n = triton.next_power_of_2(max(16, args["SK"])) if single else config.kwargs["BLOCK_N"]
    stages = 1 if single else config.num_stages
    # Shared memory: K and V tiles per pipeline stage plus Q (matches Triton's allocation for sm_90 within 1 KB),
    # against the H100's 227 KB per block.
    smem_ok = 2 * (2 * stages * block_n + block_m) * (d0 + d1) <= 227 * 1024
    # Registers: a [128, > 80] fp32 accumulator with 4 warps spilled in the sm_90 compile (benchmarks/NOTES_kernels.md).
    regs_ok = not (block_m == 128 and config.num_warps == 4 and d0 + d1 > 80)
    return smem_ok and regs_ok


def _prune(single: bool):
    def prune(configs, args):
        pow2 = triton.next_power_of_2(args["HEAD_DIM"]) == args["HEAD_DIM"]
        keep = [c for c in configs if not (pow2 and c.kwargs.get("SPLIT_D")) and _fits(c, args, single)]
        return keep or configs[:1]

    return prune


def _configs(single: bool):
    if single:
        tiles = [(128, None, 8, 1), (64, None, 4, 1)]
    else:
        tiles = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)]
    out = []
    for split in (True, False):
        for bm, bn, warps, stages in tiles:
            kw = {"BLOCK_M": bm, "SPLIT_D": split}
            if bn is not None:
                kw["BLOCK_N"] = bn
            out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


def _heuristics():
    return triton.heuristics(
        {
            "D0": lambda a: _head_split(a["HEAD_DIM"], a["SPLIT_D"])[0],
            "D1": lambda a: _head_split(a["HEAD_DIM"], a["SPLIT_D"])[1],
            "EVEN_M": lambda a: a["SQ"] % a["BLOCK_M"] == 0,
            "EVEN_N": lambda a: a["SK"] % a["BLOCK_N"] == 0,
        }
    )


@triton.jit
def _exp2_poly(x):
    """2^x on the FMA units for x <= 0 (-inf gives ~1e-38): x = j + f with j = round(x) (the 1.5 * 2^23 trick rounds
    in the adder, and j sits in the low mantissa bits), 2^f for |f| <= 1/2 by a degree-3 fit (relative error 7.5e-5,
    under half an fp16 ulp: 4.9e-4), and j added to the exponent field."""
    x = tl.maximum(x, -126.0)
    shifted = x + 12582912.0
    j = shifted - 12582912.0
    f = x - j
    p = ((0.05517166480 * f + 0.24261112511) * f + 0.69326096773) * f + 0.99992805719
    bits = p.to(tl.int32, bitcast=True) + (shifted.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _numerators(x, MODE: tl.constexpr, out_dtype: tl.constexpr):
    """(2^x in out_dtype for the p.v product, its row sums in fp32) for a [rows, keys] fp32 tile."""
    if MODE == 1:
        p = tl.inline_asm_elementwise(
            "ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16, is_pure=True, pack=2
        )
        return p, tl.sum(p.to(tl.float32), 1)
    if MODE == 2:
        rows: tl.constexpr = x.shape[0]
        keys: tl.constexpr = x.shape[1]
        even, odd = tl.split(tl.reshape(x, (rows, keys // 2, 2)))
        p32 = tl.reshape(tl.join(tl.exp2(even), _exp2_poly(odd)), (rows, keys))
    elif MODE == 3:
        p32 = _exp2_poly(x)
    else:
        p32 = tl.exp2(x)
    return p32.to(out_dtype), tl.sum(p32, 1)


@triton.jit
def _attention_kernel(
    Q,  # [B, SQ, H, HEAD_DIM] queries, strides (stride_qb, stride_qs, stride_qh, 1)
    K,  # [B, SK, H, HEAD_DIM] keys
    V,  # [B, SK, H, HEAD_DIM] values
    OUT,  # [B, SQ, H, HEAD_DIM] output
    stride_qb,  # q batch stride / STRIDE_MULT
    stride_qs,  # q sequence stride / STRIDE_MULT
    stride_qh,  # q head stride / STRIDE_MULT
    stride_kb,  # k batch stride / STRIDE_MULT
    stride_ks,  # k sequence stride / STRIDE_MULT
    stride_kh,  # k head stride / STRIDE_MULT
    stride_vb,  # v batch stride / STRIDE_MULT
    stride_vs,  # v sequence stride / STRIDE_MULT
    stride_vh,  # v head stride / STRIDE_MULT
    stride_ob,  # o batch stride / STRIDE_MULT
    stride_os,  # o sequence stride / STRIDE_MULT
    stride_oh,  # o head stride / STRIDE_MULT
    H,  # heads
    SQ,  # query length
    SK,  # key length
    qk_scale,  # softmax scale * log2(e): scores go through exp2
    HEAD_DIM: tl.constexpr,  # true head dim
    SPLIT_D: tl.constexpr,  # cover the head dim with two power-of-two pieces (tuning knob, read by heuristics)
    D0: tl.constexpr,  # first head-dim piece (power of two)
    D1: tl.constexpr,  # second head-dim piece starting at D0 (power of two), 0 if none
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per iteration (>= SK on the single-block path)
    SINGLE_BLOCK: tl.constexpr,  # all keys in one block: plain softmax, no rescaling loop
    EVEN_M: tl.constexpr,  # SQ % BLOCK_M == 0: no query mask
    EVEN_N: tl.constexpr,  # SK % BLOCK_N == 0: no key mask
    STRIDE_MULT: tl.constexpr,  # every stride is a multiple of this (8: 16-byte rows, so loads vectorise)
    DOT_FP32: tl.constexpr,  # upcast dot operands (interpreter: its bf16 dot is wrong in triton 3.9)
    EXP2_MODE: tl.constexpr,  # how the exponentials are evaluated (EXP2_MODES)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (grid_dependency.py)
):
    wait_for_predecessor(PDL)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    # Strides arrive divided by STRIDE_MULT so the compiler can prove 16-byte alignment (head dim 40 gives a head
    # stride of 40, which Triton's divisible-by-16 specialisation would miss).
    q_base = Q + (b * stride_qb + h * stride_qh) * STRIDE_MULT
    k_base = K + (b * stride_kb + h * stride_kh) * STRIDE_MULT
    v_base = V + (b * stride_vb + h * stride_vh) * STRIDE_MULT
    o_base = OUT + (b * stride_ob + h * stride_oh) * STRIDE_MULT
    stride_qs = stride_qs * STRIDE_MULT
    stride_ks = stride_ks * STRIDE_MULT
    stride_vs = stride_vs * STRIDE_MULT
    stride_os = stride_os * STRIDE_MULT

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    m_ok = offs_m < SQ
    q_mask0 = m_ok[:, None] & (d0[None, :] < HEAD_DIM)
    q0 = tl.load(q_base + offs_m[:, None] * stride_qs + d0[None, :], mask=q_mask0, other=0.0)
    if DOT_FP32:
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q_mask1 = m_ok[:, None] & (d1[None, :] < HEAD_DIM)
        q1 = tl.load(q_base + offs_m[:, None] * stride_qs + d1[None, :], mask=q_mask1, other=0.0)
        if DOT_FP32:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)

    if SINGLE_BLOCK:
        # Cross-attention: every key in one tile.
        n_ok = offs_n < SK
        kv_mask0 = n_ok[:, None] & (d0[None, :] < HEAD_DIM)
        k0 = tl.load(k_base + offs_n[:, None] * stride_ks + d0[None, :], mask=kv_mask0, other=0.0)
        v0 = tl.load(v_base + offs_n[:, None] * stride_vs + d0[None, :], mask=kv_mask0, other=0.0)
        if DOT_FP32:
            k0 = k0.to(tl.float32)
        qk = tl.dot(q0, tl.trans(k0))
        if D1 > 0:
            kv_mask1 = n_ok[:, None] & (d1[None, :] < HEAD_DIM)
            k1 = tl.load(k_base + offs_n[:, None] * stride_ks + d1[None, :], mask=kv_mask1, other=0.0)
            v1 = tl.load(v_base + offs_n[:, None] * stride_vs + d1[None, :], mask=kv_mask1, other=0.0)
            if DOT_FP32:
                k1 = k1.to(tl.float32)
            qk = tl.dot(q1, tl.trans(k1), qk)
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
        m_i = tl.max(qk, 1)
        p, l_i = _numerators(qk - m_i[:, None], EXP2_MODE, V.dtype.element_ty)
        if DOT_FP32:
            p = p.to(tl.float32)
            v0 = v0.to(tl.float32)
        acc0 = tl.dot(p, v0, acc0)
        if D1 > 0:
            if DOT_FP32:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(p, v1, acc1)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, SK, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < SK
            if EVEN_N:
                kv_mask0 = d0[None, :] < HEAD_DIM
            else:
                kv_mask0 = n_ok[:, None] & (d0[None, :] < HEAD_DIM)
            if D0 > HEAD_DIM or not EVEN_N:  # masks only where a piece runs past the head dim
                k0 = tl.load(k_base + cols[:, None] * stride_ks + d0[None, :], mask=kv_mask0, other=0.0)
            else:
                k0 = tl.load(k_base + cols[:, None] * stride_ks + d0[None, :])
            if DOT_FP32:
                k0 = k0.to(tl.float32)
            qk = tl.dot(q0, tl.trans(k0))
            if D1 > 0:
                if EVEN_N:
                    kv_mask1 = d1[None, :] < HEAD_DIM
                else:
                    kv_mask1 = n_ok[:, None] & (d1[None, :] < HEAD_DIM)
                if D0 + D1 > HEAD_DIM or not EVEN_N:
                    k1 = tl.load(k_base + cols[:, None] * stride_ks + d1[None, :], mask=kv_mask1, other=0.0)
                else:
                    k1 = tl.load(k_base + cols[:, None] * stride_ks + d1[None, :])
                if DOT_FP32:
                    k1 = k1.to(tl.float32)
                qk = tl.dot(q1, tl.trans(k1), qk)
            if not EVEN_N:
                qk = tl.where(n_ok[None, :], qk, float("-inf"))
            # Online softmax (Milakov & Gimelshein 2018) in the exp2 domain; the scale folds into one FMA.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p, p_sum = _numerators(qk * qk_scale - m_new[:, None], EXP2_MODE, V.dtype.element_ty)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + p_sum
            m_i = m_new
            if DOT_FP32:
                p = p.to(tl.float32)
            if D0 > HEAD_DIM or not EVEN_N:  # masks only where a piece runs past the head dim
                v0 = tl.load(v_base + cols[:, None] * stride_vs + d0[None, :], mask=kv_mask0, other=0.0)
            else:
                v0 = tl.load(v_base + cols[:, None] * stride_vs + d0[None, :])
            if DOT_FP32:
                v0 = v0.to(tl.float32)
            acc0 = tl.dot(p, v0, acc0 * alpha[:, None])
            if D1 > 0:
                if D0 + D1 > HEAD_DIM or not EVEN_N:
                    v1 = tl.load(v_base + cols[:, None] * stride_vs + d1[None, :], mask=kv_mask1, other=0.0)
                else:
                    v1 = tl.load(v_base + cols[:, None] * stride_vs + d1[None, :])
                if DOT_FP32:
                    v1 = v1.to(tl.float32)
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None])

    inv_l = 1.0 / l_i
    o_ptrs0 = o_base + offs_m[:, None] * stride_os + d0[None, :]
    out0 = (acc0 * inv_l[:, None]).to(OUT.dtype.element_ty)
    if EVEN_M and D0 <= HEAD_DIM:
        tl.store(o_ptrs0, out0)
    else:
        tl.store(o_ptrs0, out0, mask=q_mask0)
    if D1 > 0:
        out1 = (acc1 * inv_l[:, None]).to(OUT.dtype.element_ty)
        tl.store(o_base + offs_m[:, None] * stride_os + d1[None, :], out1, mask=q_mask1)


_KEY = ["SQ", "SK", "HEAD_DIM", "EXP2_MODE"]  # each exponential mode tunes its own tile
_attention_loop = autotune(_configs(single=False), key=_KEY, prune=_prune(False))(_heuristics()(_attention_kernel))
_attention_single = autotune(_configs(single=True), key=_KEY, prune=_prune(True))(_heuristics()(_attention_kernel))
_attention_untuned = _heuristics()(_attention_kernel)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    want_device = "cpu" if _INTERPRET else "cuda"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != want_device:
            raise ValueError(
                f"{name} is on {t.device}; attention runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), "
                f"expected a {want_device} tensor"
            )
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} has dtype {t.dtype}; allowed: float16, bfloat16")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s head dim must be contiguous (stride 1), got strides {t.stride()}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(
            f"k and v must be [batch={b}, keys, heads={h}, head_dim={d}], got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not 1 <= d <= 256:
        raise ValueError(f"head_dim {d} is not supported; allowed: 1 to 256 (UNets use 40, 64, 80, 128, 160)")
    if k.shape[1] == 0:
        raise ValueError("k and v have no keys; attention needs at least one")


def _exp2_mode(exp2: str | None, dtype: torch.dtype) -> int:
    name = EXP2 if exp2 is None else exp2
    if name not in EXP2_MODES:
        raise ValueError(f"exp2 {name!r} is not a mode; allowed: {', '.join(EXP2_MODES)}")
    if name == "half2" and (_INTERPRET or dtype != torch.float16):
        name = "mufu"  # inline PTX does not run in the interpreter, and its half2 results are fp16
    return EXP2_MODES[name]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    exp2: str | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, Sq, H, D], k/v [B, Sk, H, D]; returns [B, Sq, H, D].

    The result is a new contiguous tensor, or `out` (any strides with the head dim contiguous, e.g. a view of the
    [B, Sq, H * D] input of the output projection).

    scale defaults to 1/sqrt(D); exp2 names how the exponentials are evaluated (EXP2_MODES; default EXP2). The
    first call per shape autotunes, so call once before capturing a CUDA graph; `config` (BLOCK_M, SPLIT_D and on
    the loop path BLOCK_N, with warps and stages) runs that one instead, untuned (benchmarks/attention_variants.py).
    """
    _check_inputs(q, k, v)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if out is None:
        o = torch.empty((b, sq, h, d), device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous head dim, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}"
        )
    else:
        o = out
    if o.numel() == 0:
        return o
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    aligned = all(t.data_ptr() % 16 == 0 for t in (q, k, v, o))
    mult = 8 if aligned and all(st % 8 == 0 for st in strides) else 1
    args = (q, k, v, o, *(st // mult for st in strides), h, sq, sk)
    dot_fp32 = _INTERPRET and q.dtype == torch.bfloat16

    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * h)

    single = sk <= SINGLE_BLOCK_MAX_KEYS
    mode = _exp2_mode(exp2, q.dtype)
    fixed = dict(HEAD_DIM=d, SINGLE_BLOCK=single, STRIDE_MULT=mult, DOT_FP32=dot_fp32, EXP2_MODE=mode)
    if single:
        fixed["BLOCK_N"] = max(16, triton.next_power_of_2(sk))
    if config is None:
        kernel = _attention_single if single else _attention_loop
    else:
        kernel = _attention_untuned
        fixed.update(config.all_kwargs())
    kernel[grid](*args, scale * math.log2(math.e), **fixed, **launch_options(q.device))
    return o


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain torch: F.scaled_dot_product_attention on [B, S, H, D] views, in q's dtype; returns [B, Sq, H, D].

    The tests' reference (on fp32 copies, where the math backend is exact fp32) and the benchmark's peer.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
