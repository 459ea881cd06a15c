"""kernels/geglu_linear.py (GEGLU's projection and gate in one GEMM) against the fp32 reference: labelled edge shapes
on CPU (Triton interpreter), the UNets' feed-forward shapes on GPU. Each case also holds the kernel to twice torch's
own error in the same dtype (its projection, then the gate)."""

import pytest
import torch

from diffrt.kernels.geglu_linear import geglu_linear, geglu_linear_reference
from tests.helpers.kernel_checks import TOLERANCES, check_output, device

HALVES = [
    pytest.param(dt, *TOLERANCES[dt], id=str(dt).removeprefix("torch.")) for dt in (torch.float16, torch.bfloat16)
]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _check(rows: tuple[int, ...], k: int, d: int, dtype, atol, rtol, what, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, k, generator=g).to(device(), dtype)
    weight = (torch.randn(2 * d, k, generator=g) * k**-0.5).to(device(), dtype)  # unit-scale outputs: both GELU tails
    bias = (torch.randn(2 * d, generator=g) * 0.5).to(device(), dtype)
    y = geglu_linear(x, weight, bias)
    assert y.shape == (*rows, d) and y.dtype == dtype
    ref = geglu_linear_reference(x.float(), weight.float(), bias.float())
    return check_output(y, ref, geglu_linear_reference(x, weight, bias), atol, rtol, what)


# (label, token dims, K, D): tails in every dimension against the 64-wide tiles, one token, a 3-D batch, K below one
# tile, CLIP-like 77 tokens.
EDGE_SHAPES = [
    ("rows70_k96_d72", (70,), 96, 72),
    ("one_token_k40_d20", (1,), 40, 20),
    ("batch2_tokens77_k64_d48", (2, 77), 64, 48),
    ("rows130_k136_d130", (130,), 136, 130),
]


@pytest.mark.parametrize("label,rows,k,d", EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("dtype,atol,rtol", HALVES)
def test_edge_shapes(label, rows, k, d, dtype, atol, rtol):
    _check(rows, k, d, dtype, atol, rtol, f"{label} {dtype}")


def test_reads_rows_of_a_wider_tensor():
    """x as a slice of a wider buffer (rows not contiguous with each other): the kernel reads a contiguous copy."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(33, 100, generator=g).to(device(), torch.float16)
    x = wide[:, :64]
    weight = (torch.randn(96, 64, generator=g) * 0.125).to(device(), torch.float16)
    bias = torch.randn(96, generator=g).to(device(), torch.float16)
    ref = geglu_linear_reference(x.float(), weight.float(), bias.float())
    check_output(geglu_linear(x, weight, bias), ref, geglu_linear_reference(x, weight, bias), 1e-2, 1e-2, "sliced x")


def test_rejects_what_it_cannot_run():
    x, w, b = (torch.zeros(s, dtype=torch.float16, device=device()) for s in ((4, 8), (6, 8), (6,)))
    with pytest.raises(ValueError, match="half-precision"):
        geglu_linear(x.float(), w.float(), b.float())
    with pytest.raises(ValueError, match="weight"):
        geglu_linear(x, w[:5], b[:5])  # an odd number of output rows: no [h | gate] split
    with pytest.raises(ValueError, match="weight"):
        geglu_linear(x[:, :7], w[:, :7], b)  # K matches, but the weight's rows are strided


# The UNets' feed-forward GEGLU projections (tokens, K, D): SD2.1 at 512² per level, SD2.1's widest level at 1024²,
# SDXL's two levels at 1024².
REAL_SHAPES = [(4096, 320, 1280), (1024, 640, 2560), (256, 1280, 5120), (16384, 320, 1280), (4096, 640, 2560),
               (1024, 1280, 5120)]  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k,d", REAL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_real_shapes(m, k, d, dtype):
    _check((1, m), k, d, dtype, *TOLERANCES[dtype], f"{(m, k, d)} {dtype}")
