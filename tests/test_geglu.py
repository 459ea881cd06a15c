"""kernels/geglu.py against torch's GELU gate: labelled edge shapes on CPU (Triton interpreter), UNet shapes on GPU."""

import pytest
import torch

from diffrt.kernels.geglu import geglu, geglu_reference
from tests.helpers.kernel_checks import DTYPES, TOLERANCES, check_output, device, poisoned_like

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _check(shape, dtype, atol, rtol, what, seed=0):
    g = torch.Generator().manual_seed(seed)
    hg = (torch.randn(shape, generator=g) * 1.5).to(device(), dtype)  # gates into both tails of the GELU
    out = poisoned_like(hg[..., : shape[-1] // 2].contiguous())
    y = geglu(hg, out=out)
    assert y is out
    return check_output(y, geglu_reference(hg.float()), geglu_reference(hg), atol, rtol, what)


# (label, shape of [h | gate]): width not a multiple of the tile, one token, 3-D batches of tokens.
EDGE_SHAPES = [
    ("tokens77_d40", (2, 77, 80)),
    ("one_token_d300", (1, 1, 600)),
    ("rows13_d136", (13, 272)),
    ("batch3_tokens9_d20", (3, 9, 40)),
]


@pytest.mark.parametrize("label,shape", EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_edge_shapes(label, shape, dtype, atol, rtol):
    _check(shape, dtype, atol, rtol, f"{label} {dtype}")


def test_rejects_odd_or_strided_input():
    with pytest.raises(ValueError, match="contiguous"):
        geglu(torch.randn(4, 7, device=device()))
    with pytest.raises(ValueError, match="contiguous"):
        geglu(torch.randn(8, 4, device=device()).t())


# The SD2.1 feed-forward at 512² (tokens x 2 * 4 * width) per level, and SDXL's 1280-wide level at 1024².
REAL_SHAPES = [(1, 4096, 2560), (2, 1024, 5120), (1, 256, 10240), (1, 1024, 10240)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_real_shapes(shape, dtype):
    _check(shape, dtype, *TOLERANCES[dtype], f"{shape} {dtype}")
