"""kernels/upsample_conv.py: nearest 2x upsampling and a 3x3 convolution as four 2x2 phase convolutions at the input's
resolution. The decomposition itself is exact (float64, no kernel); the kernel path (the phase convolution, then the
Triton interleave with the bias) against the fp32 reference over labelled edge shapes on CPU (Triton interpreter) and
the VAE decoders' upsamplers on GPU, each within twice torch's own error in the same dtype."""

import pytest
import torch

from diffrt.kernels.upsample_conv import interleave_phases, phase_weights, upsample_conv2x, upsample_conv2x_reference
from tests.helpers.kernel_checks import DTYPES, TOLERANCES, check_output, device

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _inputs(n, c_in, c_out, h, w, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) * (9 * c_in) ** -0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    return x, weight, b


@pytest.mark.parametrize("n,c_in,c_out,h,w", [(1, 3, 5, 4, 6), (2, 8, 4, 5, 3), (1, 4, 4, 1, 1)])
def test_the_phase_decomposition_is_the_upsampled_convolution(n, c_in, c_out, h, w):
    x, weight, bias = _inputs(n, c_in, c_out, h, w)
    p = torch.nn.functional.conv2d(x, phase_weights(weight), None, 1, 1)  # [N, 4 C_out, H + 1, W + 1]
    y = torch.empty(n, c_out, 2 * h, 2 * w, dtype=torch.float64)
    for a in (0, 1):
        for b in (0, 1):
            k = 2 * a + b
            y[:, :, a::2, b::2] = p[:, k * c_out : (k + 1) * c_out, a : a + h, b : b + w]
    assert (y - upsample_conv2x_reference(x, weight, None)).abs().max().item() < 1e-12


# (label, N, C_in, C_out, H, W): odd sizes, a batch, channels off the tile, one pixel, no bias.
EDGE_SHAPES = [
    ("odd_w_c5", 1, 3, 5, 4, 7),
    ("batch2_c20", 2, 16, 20, 5, 3),
    ("c136_rows9", 1, 8, 136, 9, 6),
    ("one_pixel", 1, 4, 8, 1, 1),
]


@pytest.mark.parametrize("label,n,c_in,c_out,h,w", EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_edge_shapes(label, n, c_in, c_out, h, w, dtype, atol, rtol, bias):
    x, weight, b = _inputs(n, c_in, c_out, h, w, bias=bias)
    cast = [t if t is None else t.to(device(), dtype) for t in (x, weight, b)]
    xd, wd, bd = cast
    got = upsample_conv2x(xd.contiguous(memory_format=torch.channels_last), phase_weights(wd), bd)
    assert got.shape == (n, c_out, 2 * h, 2 * w) and got.is_contiguous(memory_format=torch.channels_last)
    ref = upsample_conv2x_reference(x, weight, b)
    torch_own = upsample_conv2x_reference(xd, wd, bd)
    check_output(got, ref, torch_own, atol, rtol, f"{label} {dtype}")


def test_rejects_what_it_cannot_interleave():
    p = torch.zeros(1, 8, 3, 4, device=device()).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels-last"):
        interleave_phases(p, None, 3, 3)  # its shape says H = 2, W = 3
    with pytest.raises(ValueError, match="channels-last"):
        interleave_phases(p.contiguous(), None, 2, 3)  # NCHW memory
    with pytest.raises(ValueError, match="bias"):
        interleave_phases(p, torch.zeros(3, device=device()), 2, 3)
    with pytest.raises(ValueError, match="3, 3"):
        phase_weights(torch.zeros(2, 2, 1, 1))


# The SD VAE decoder's three upsamplers at 512² (input 64², 128², 256²) and the two largest at 1024².
REAL_SHAPES = [(512, 64), (512, 128), (256, 256), (512, 256), (256, 512)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("channels,side", REAL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_real_shapes(channels, side, dtype):
    x, weight, b = _inputs(1, channels, channels, side, side)
    xd, wd, bd = (t.to("cuda", dtype) for t in (x, weight, b))
    got = upsample_conv2x(xd.contiguous(memory_format=torch.channels_last), phase_weights(wd), bd)
    ref = upsample_conv2x_reference(x.float().cuda(), weight.float().cuda(), b.float().cuda())
    torch_own = upsample_conv2x_reference(xd.contiguous(memory_format=torch.channels_last), wd, bd)
    check_output(got, ref, torch_own, *TOLERANCES[dtype], f"{channels}x{side}² {dtype}")
