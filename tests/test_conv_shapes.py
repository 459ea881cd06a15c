"""benchmarks/conv_shapes.py: the convolutions it records are all of a component's (their FLOPs are what
torch.profiler counts for aten::conv2d), and on a GPU every variant it times computes the same convolution."""

import pytest
import torch
from torch.profiler import profile

from benchmarks import conv_shapes
from benchmarks.profile_components import component_calls
from diffrt.pipeline import Pipeline

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


@pytest.fixture(scope="module")
def calls():
    pipe = Pipeline.from_pretrained("tiny-sd15", backend="torch")
    return component_calls(pipe, 64, batch=1, guidance=0.0)


@pytest.mark.parametrize("component", ["vae_decode", "unet_step"])
def test_recorded_shapes_are_every_convolution(calls, component):
    fn, _ = calls[component]
    shapes = conv_shapes.record(fn)
    assert sum(shapes.values()) > 3, shapes
    with torch.inference_mode(), profile(with_flops=True) as prof:
        fn()
    counted = sum(e.flops for e in prof.key_averages() if e.key == "aten::conv2d") / 1e9
    assert sum(conv_shapes.gflop(s) * n for s, n in shapes.items()) == pytest.approx(counted, rel=1e-6)


def test_gflop_of_a_strided_convolution():
    # [1, 8, 16, 16] * [4, 8, 3, 3], stride 2, padding 1 -> 8x8 outputs of 4 channels, 72 MACs each
    shape = ((1, 8, 16, 16), (4, 8, 3, 3), (2, 2), (1, 1), (1, 1), 1, "torch.float16")
    assert conv_shapes.gflop(shape) == pytest.approx(2 * 64 * 4 * 72 / 1e9)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "shape",
    [
        ((1, 128, 64, 64), (3, 128, 3, 3), (1, 1), (1, 1), (1, 1), 1, "torch.float16"),  # padded out
        ((1, 320, 32, 32), (4, 320, 3, 3), (1, 1), (1, 1), (1, 1), 1, "torch.float16"),  # the UNet's conv_out
        ((1, 256, 32, 32), (128, 256, 1, 1), (1, 1), (0, 0), (1, 1), 1, "torch.float16"),  # GEMM
    ],
    ids=["3-channel output", "4-channel output", "1x1"],
)
def test_every_variant_computes_the_same_convolution(shape):
    torch.manual_seed(0)
    calls = conv_shapes.variants(shape)
    reference = calls["NCHW"][0]().float()
    for name, (fn, _) in calls.items():
        out = fn().float()
        if name == "GEMM":  # [pixels, N] of the channels-last output
            out = out.reshape(shape[0][0], shape[0][2], shape[0][3], -1).permute(0, 3, 1, 2)
        assert out.shape == reference.shape, (name, tuple(out.shape))
        assert torch.allclose(out, reference, atol=2e-2, rtol=1e-2), (name, (out - reference).abs().max())
