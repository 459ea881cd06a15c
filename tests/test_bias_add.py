"""kernels/bias_add.py against torch: labelled edge shapes on CPU (Triton interpreter), UNet/VAE shapes on GPU."""

import pytest
import torch

from diffrt.kernels.bias_add import bias_add, bias_add_reference, supports
from tests.helpers.kernel_checks import DTYPES, TOLERANCES, check_output, device, poisoned_like

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _inputs(shape, dtype, residual: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    b = torch.randn(shape[1], generator=g)
    r = torch.randn(shape, generator=g) if residual else None
    cl = torch.channels_last
    to = (
        (lambda t: t.to(device(), dtype).to(memory_format=cl)) if len(shape) == 4 else (lambda t: t.to(device(), dtype))
    )
    return to(x), b.to(device(), dtype), None if r is None else to(r)


def _check(x, b, r, scale, atol, rtol, what, relu=False):
    out = poisoned_like(x)
    y = bias_add(x, b, r, scale, out=out, relu=relu)
    assert y is out
    ref = bias_add_reference(x.float(), b.float(), None if r is None else r.float(), scale, relu)
    if relu:
        assert (ref == 0).float().mean() > 0.2, "the ReLU must clip a good share for the check to mean something"
    return check_output(y, ref, bias_add_reference(x, b, r, scale, relu), atol, rtol, what)


# (label, shape): channels not a multiple of the tile, a single pixel, odd H*W, a plain [M, C] matrix.
EDGE_SHAPES = [
    ("c20_odd_hw", (2, 20, 7, 9)),
    ("c3_rgb", (1, 3, 5, 6)),
    ("one_pixel_c300", (1, 300, 1, 1)),
    ("c136_rows", (1, 136, 3, 17)),
    ("matrix_m33_c40", (33, 40)),
]


EPILOGUES = [(False, 1.0, False), (True, 1.0, False), (True, 0.5, False), (False, 1.0, True), (True, 1.0, True)]


@pytest.mark.parametrize(
    "residual,scale,relu", EPILOGUES, ids=["bias", "res", "res_scaled", "bias_relu", "res_relu"]
)  # fmt: skip
@pytest.mark.parametrize("label,shape", EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_edge_shapes(label, shape, residual, scale, relu, dtype, atol, rtol):
    x, b, r = _inputs(shape, dtype, residual)
    _check(x, b, r, scale, atol, rtol, f"{label} {dtype}", relu)


def test_in_place_into_x():
    x, b, r = _inputs((2, 24, 5, 7), torch.float32, True)
    expected = bias_add_reference(x, b, r)
    assert bias_add(x, b, r, out=x) is x
    torch.testing.assert_close(x, expected)


def test_rejects_layouts_it_cannot_read_as_rows():
    x, b, _ = _inputs((1, 8, 4, 4), torch.float32, False)
    nchw = x.contiguous()
    assert not supports(nchw) and supports(x) and not supports(x, nchw)
    with pytest.raises(ValueError, match="channels-last"):
        bias_add(nchw, b)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        bias_add(x, b[:4])


# UNet, VAE decoder and TAESD conv outputs at 512² (fp16, channels-last), with the residual as a ResNet block adds it.
REAL_SHAPES = [(1, 320, 64, 64), (2, 640, 32, 32), (1, 1280, 8, 8), (1, 512, 128, 128), (1, 128, 512, 512),
               (1, 64, 512, 512), (3, 64, 128, 128)]  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual,relu", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["bias", "res", "bias_relu", "res_relu"])  # fmt: skip
def test_real_shapes(shape, residual, relu):
    x, b, r = _inputs(shape, torch.float16, residual)
    _check(x, b, r, 1.0, *TOLERANCES[torch.float16], f"{shape}", relu)


@pytest.mark.gpu
@gpu
def test_in_place_on_the_autotuning_call(tmp_path, monkeypatch):
    """The first call of a shape times every config on its arguments: in place, each timed run would add the bias
    again unless autotuning restores the output."""
    from diffrt.kernels.bias_add import _bias_add_kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # no tuning result on disk from an earlier run
    _bias_add_kernel.cache.clear()  # nor in this process: the call below autotunes
    x, b, r = _inputs((1, 72, 11, 13), torch.float16, True, seed=3)
    expected = bias_add_reference(x.float(), b.float(), r.float())
    bias_add(x, b, r, out=x)
    torch.testing.assert_close(x.float(), expected, atol=1e-2, rtol=1e-2)
