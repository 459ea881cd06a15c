"""kernels/upsample.py against F.interpolate's nearest mode: edge shapes on CPU (Triton interpreter), VAE shapes on GPU.

Nearest upsampling copies values, so the kernel must match torch exactly in every dtype."""

import pytest
import torch

from diffrt.kernels.upsample import upsample_nearest2x, upsample_nearest2x_reference
from tests.helpers.kernel_checks import device

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _check(shape, dtype):
    x = torch.randn(shape).to(device(), dtype).to(memory_format=torch.channels_last)
    y = upsample_nearest2x(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, upsample_nearest2x_reference(x)), f"{shape} {dtype}: not an exact 2x2 repeat"


# (label, shape): channels not a multiple of the tile, odd widths and heights, one pixel, a batch.
EDGE_SHAPES = [("c20_odd_hw", (2, 20, 3, 5)), ("one_pixel_c300", (1, 300, 1, 1)), ("c3_w17", (1, 3, 2, 17))]


@pytest.mark.parametrize("label,shape", EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_edge_shapes(label, shape, dtype):
    _check(shape, dtype)


def test_rejects_nchw():
    with pytest.raises(ValueError, match="channels-last"):
        upsample_nearest2x(torch.randn(1, 4, 3, 3, device=device()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(1, 512, 64, 64), (1, 512, 256, 256), (1, 1280, 16, 16), (2, 640, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_real_shapes(shape):
    _check(shape, torch.float16)
