"""kernels/attention.py against torch: labelled edge shapes on CPU (Triton interpreter), every UNet shape on GPU."""

import pytest
import torch
import triton
import triton.language as tl

from benchmarks.kernel_shapes import all_unet_shapes, long_prompt_shapes
from diffrt.kernels import attention as attn_mod
from diffrt.kernels._autotune import make_early_prune
from diffrt.kernels.attention import attention, attention_reference
from tests.helpers.kernel_checks import TOLERANCES, check_output, device, poisoned_like

DTYPES = [
    pytest.param(dt, *TOLERANCES[dt], id=str(dt).removeprefix("torch.")) for dt in (torch.float16, torch.bfloat16)
]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _qkv(b, sq, sk, h, d, dtype, seed=0):
    """q from a fused QKV projection [B, Sq, 3, H, D] (self-attention) or q [B, Sq, H, D] plus a fused KV projection
    [B, Sk, 2, H, D] (cross-attention): strided views, as the UNet produces them."""
    g = torch.Generator().manual_seed(seed)
    dev = device()
    if sq == sk:
        qkv = torch.randn(b, sq, 3, h, d, generator=g).to(dev, dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(b, sq, h, d, generator=g).to(dev, dtype)
    kv = torch.randn(b, sk, 2, h, d, generator=g).to(dev, dtype)
    return q, kv[:, :, 0], kv[:, :, 1]


def _reference_fp32(q, k, v, scale=None):
    # Head by head keeps the fp32 score matrix small (16384 x 16384 at the largest UNet shape).
    return torch.cat(
        [attention_reference(q[:, :, i : i + 1].float(), k[:, :, i : i + 1].float(), v[:, :, i : i + 1].float(), scale)
         for i in range(q.shape[2])], dim=2,
    )  # fmt: skip


def _run_and_check(q, k, v, atol, rtol, what, scale=None):
    out = poisoned_like(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    o = attention(q, k, v, scale=scale, out=out)
    assert o is out
    return check_output(o, _reference_fp32(q, k, v, scale), attention_reference(q, k, v, scale), atol, rtol, what)


# ---------------------------------------------------------------------------------------------- CPU: edge shapes
# (label, B, Sq, Sk, H, D). Sk <= 128 takes the single-block path, longer key lengths the online-softmax loop.
EDGE = [
    ("cross77_d40_sq70", 1, 70, 77, 2, 40),
    ("cross154_d80", 1, 33, 154, 2, 80),
    ("self_d64_single", 2, 96, 96, 1, 64),
    ("self_d128_odd", 1, 17, 17, 1, 128),
    ("cross1_d64", 1, 20, 1, 1, 64),
    ("loop_d160_sk300", 1, 40, 300, 1, 160),
    ("loop_d80_self260", 1, 260, 260, 1, 80),
    ("loop_d40_sk257", 1, 24, 257, 2, 40),
]


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("label", "b", "sq", "sk", "h", "d"), EDGE, ids=[e[0] for e in EDGE])
def test_edge_shapes(label, b, sq, sk, h, d, dtype, atol, rtol):
    q, k, v = _qkv(b, sq, sk, h, d, dtype)
    _run_and_check(q, k, v, atol, rtol, label)


def test_head_major_layout_and_scale():
    # q/k/v as transposed views of [B, H, S, D] tensors, and an explicit softmax scale.
    atol, rtol = TOLERANCES[torch.float16]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, s, 40, generator=g).to(device(), torch.float16).transpose(1, 2) for s in (50, 77, 77))
    _run_and_check(q, k, v, atol, rtol, "head-major", scale=0.3)


def test_out_into_strided_buffer():
    # Write straight into a [B, Sq, H * D] buffer with padding columns (e.g. the output projection's input).
    q, k, v = _qkv(1, 40, 77, 2, 40, torch.float16)
    buf = torch.full((1, 40, 2 * 40 + 8), float("nan"), dtype=torch.float16, device=q.device)
    out = buf[:, :, :80].unflatten(-1, (2, 40))
    attention(q, k, v, out=out)
    assert torch.isnan(buf[:, :, 80:]).all(), "wrote outside the output view"
    check_output(out, _reference_fp32(q, k, v), attention_reference(q, k, v), *TOLERANCES[torch.float16], "out=")


@pytest.mark.parametrize(("label", "sq", "sk", "d"), [("single_d40", 40, 77, 40), ("loop_d80", 33, 270, 80)])
def test_padded_head_dim_path(label, sq, sk, d, monkeypatch):
    # Autotuning may choose one padded power-of-two tile (D0 = 64 for d=40) instead of two pieces: test that too,
    # with other tile sizes, by pinning the one config.
    single = triton.Config({"BLOCK_M": 64, "SPLIT_D": False}, num_warps=4, num_stages=1)
    loop = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "SPLIT_D": False}, num_warps=4, num_stages=2)
    monkeypatch.setattr(attn_mod._attention_single, "configs", [single])
    monkeypatch.setattr(attn_mod._attention_loop, "configs", [loop])
    q, k, v = _qkv(1, sq, sk, 2, d, torch.float16)
    _run_and_check(q, k, v, *TOLERANCES[torch.float16], label)


# The exponential modes through the interpreter ("half2" is inline PTX: it runs as "mufu" here, on the GPU below).
MODE_EDGE = [e for e in EDGE if e[0] in ("cross77_d40_sq70", "loop_d80_self260", "loop_d40_sk257", "cross1_d64")]


@pytest.mark.parametrize("exp2", ["split", "poly"])
@pytest.mark.parametrize(("label", "b", "sq", "sk", "h", "d"), MODE_EDGE, ids=[e[0] for e in MODE_EDGE])
def test_exponential_modes_on_edge_shapes(label, b, sq, sk, h, d, exp2):
    q, k, v = _qkv(b, sq, sk, h, d, torch.float16, seed=3)
    out = poisoned_like(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    attention(q, k, v, out=out, exp2=exp2)
    check_output(out, _reference_fp32(q, k, v), attention_reference(q, k, v), *TOLERANCES[torch.float16], label)


@triton.jit
def _exp2_poly_probe(X, OUT, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(OUT + offs, attn_mod._exp2_poly(tl.load(X + offs)))


def test_polynomial_exponential_is_within_a_tenth_of_an_fp16_ulp():
    # Every exponent the softmax feeds it (x <= 0, -inf for masked keys) and the fractions between integers.
    x = torch.cat([torch.linspace(-30.0, 0.0, 4092), torch.tensor([-100.0, -125.9, -500.0, float("-inf")])])
    out = torch.empty_like(x)
    _exp2_poly_probe[(1,)](x.to(device()), out := out.to(device()), N=x.numel())
    ref = torch.exp2(x.double())
    rel = ((out.cpu().double() - ref).abs() / ref.clamp_min(1e-300))[:4093]
    assert rel.max().item() < 1e-4, f"relative error {rel.max().item():.3g} (fp16's half ulp is 4.9e-4)"
    assert (out.cpu()[-4:] < 1e-30).all() and (out.cpu()[-4:] >= 0).all(), "masked keys must weigh ~0, never < 0"


def test_the_variant_sweep_pins_each_mode_with_each_fitting_tile():
    # benchmarks/attention_variants.py: every (mode, pinned config) of a shape once, each config one the kernel takes
    from benchmarks.attention_variants import SHAPES, configs_for, variants

    for label, _, sk, _, d in SHAPES:
        runs = list(variants(sk, d))
        assert len({name for name, _, _ in runs}) == len(runs), label
        assert len(runs) == 1 + len(attn_mod.EXP2_MODES) * len(configs_for(sk, d)) > 1 + len(attn_mod.EXP2_MODES)
    # a pinned config runs untuned (interpreter: small shapes through the loop and the single-block path)
    for sk, d in ((130, 40), (77, 64)):
        q, k, v = _qkv(1, 20, sk, 1, d, torch.float16, seed=7)
        config = configs_for(sk, d)[-1]
        out = attention(q, k, v, exp2="split", config=config)
        ref, torch_out = _reference_fp32(q, k, v), attention_reference(q, k, v)
        check_output(out, ref, torch_out, *TOLERANCES[torch.float16], str(config))


def test_unknown_exponential_mode_is_rejected():
    q, k, v = _qkv(1, 16, 77, 2, 40, torch.float16)
    with pytest.raises(ValueError, match=r"exp2 'fast' is not a mode; allowed: mufu, half2, split, poly"):
        attention(q, k, v, exp2="fast")


def test_autotune_pruning():
    # The prune hooks run only when autotuning, never under the interpreter: call them as Triton does, with the
    # positional arguments in named_args and the keyword (constexpr) ones in kwargs.
    loop = make_early_prune(attn_mod._prune(single=False))
    configs = attn_mod._configs(single=False)
    kept = loop(configs, {"SQ": 4096, "SK": 4096}, HEAD_DIM=64, SINGLE_BLOCK=False)
    assert kept and not any(c.kwargs["SPLIT_D"] for c in kept), "power-of-two head dims need no split"
    kept = loop(configs, {"SQ": 1024, "SK": 1024}, HEAD_DIM=160, SINGLE_BLOCK=False)
    assert kept and all(c.kwargs["BLOCK_M"] == 64 or c.num_warps == 8 for c in kept), "4-warp 128-row tiles spill"
    assert all(attn_mod._fits(c, {"HEAD_DIM": 160, "SK": 1024}, single=False) for c in kept)
    single = make_early_prune(attn_mod._prune(single=True))
    kept = single(attn_mod._configs(single=True), {"SQ": 4096, "SK": 77}, HEAD_DIM=40, BLOCK_N=128, SINGLE_BLOCK=True)
    assert len(kept) == 4


def test_interpreter_autotunes_one_config():
    if not attn_mod._INTERPRET:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    assert len(attn_mod._attention_single.configs) == 1
    assert len(attn_mod._attention_loop.configs) == 1


# ----------------------------------------------------------------------------------------------- input validation
def test_rejects_bad_inputs():
    q, k, v = _qkv(1, 16, 77, 2, 40, torch.float16)
    with pytest.raises(ValueError, match=r"q has dtype torch.float32; allowed: float16, bfloat16"):
        attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match=r"q, k, v must share a dtype"):
        attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match=r"k is on meta; attention runs on CUDA tensors"):
        attention(q, torch.empty(k.shape, device="meta", dtype=k.dtype), v)
    with pytest.raises(ValueError, match=r"q must be 4-D \[batch, seq, heads, head_dim\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k and v must be \[batch=1, keys, heads=2, head_dim=40\]"):
        attention(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match=r"q's head dim must be contiguous"):
        attention(q.transpose(1, 3).contiguous().transpose(1, 3), k, v)
    big = torch.empty(1, 4, 1, 320, dtype=torch.float16, device=q.device)
    with pytest.raises(ValueError, match=r"head_dim 320 is not supported"):
        attention(big, big, big)
    with pytest.raises(ValueError, match=r"out must be \(1, 16, 2, 40\)"):
        attention(q, k, v, out=torch.empty(1, 16, 2, 41, dtype=q.dtype, device=q.device))


# ---------------------------------------------------------------------------------------- GPU: the real shapes
_, UNET_ATTN = all_unet_shapes()
REAL = [pytest.param(s, id=s.label) for s in UNET_ATTN] + [pytest.param(s, id=s.label) for s in long_prompt_shapes()]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", REAL)
def test_real_shapes_fp16(shape):
    q, k, v = _qkv(1, shape.seq_q, shape.seq_k, shape.heads, shape.head_dim, torch.float16)
    _run_and_check(q, k, v, *TOLERANCES[torch.float16], shape.label)


BF16_REAL = [s for s in UNET_ATTN if s.seq_q in (1024, 4096)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", BF16_REAL, ids=[s.label for s in BF16_REAL])
def test_real_shapes_bf16(shape):
    q, k, v = _qkv(2, shape.seq_q, shape.seq_k, shape.heads, shape.head_dim, torch.bfloat16)
    _run_and_check(q, k, v, *TOLERANCES[torch.bfloat16], shape.label)


MODE_REAL = [s for s in UNET_ATTN if s.head_dim in (40, 64) and s.seq_q >= 4096]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("exp2", ["half2", "split", "poly"])
@pytest.mark.parametrize("shape", MODE_REAL, ids=[s.label for s in MODE_REAL])
def test_exponential_modes_on_real_shapes(shape, exp2):
    q, k, v = _qkv(1, shape.seq_q, shape.seq_k, shape.heads, shape.head_dim, torch.float16, seed=5)
    out = poisoned_like(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    attention(q, k, v, out=out, exp2=exp2)
    ref = _reference_fp32(q, k, v)
    check_output(out, ref, attention_reference(q, k, v), *TOLERANCES[torch.float16], f"{shape.label} {exp2}")
