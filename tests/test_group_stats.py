"""GroupNorm statistics taken by the producer's epilogue (kernels/group_norm.py bias_add_with_stats, ops.group_stats):
the epilogue writes what bias_add writes, the GroupNorm that reads its output gives what it gives without them, and
it does use them (wrong statistics change its output) only for the tensor they belong to."""

import dataclasses

import pytest
import torch

from diffrt.kernels import group_norm as gn_mod
from diffrt.kernels.bias_add import bias_add_reference
from diffrt.kernels.group_norm import bias_add_with_stats, group_norm, group_norm_reference
from diffrt.models import ops
from diffrt.models.layers import ResnetBlock2D
from tests.helpers.kernel_checks import DTYPES, check_output, device, poisoned_like

# (label, shape, groups): odd H*W, channels per group not a power of two, a batch of two.
SHAPES = [("cg5_odd_hw", (1, 20, 13, 11), 4), ("cg16_b2", (2, 64, 9, 8), 4)]


@pytest.fixture
def small_splits(monkeypatch):
    """The split path at small CPU shapes (groups above 64 elements, not 16384), with several spatial chunks and a
    short last one, folded over several finalize iterations."""
    monkeypatch.setattr(gn_mod, "FUSED_MAX_GROUP_ELEMENTS", 64)
    monkeypatch.setattr(gn_mod, "MIN_SPLIT_ROWS", 16)
    monkeypatch.setattr(gn_mod, "FINALIZE_BLOCK", 2)


def _inputs(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(shape, generator=g) * 2 + 0.5 for _ in range(2))
    bias, w, b = (torch.randn(shape[1], generator=g) for _ in range(3))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, r = (t.to(device(), dtype).to(memory_format=layout) for t in (x, r))
    return x, r, bias.to(device(), dtype), w.to(device(), dtype), b.to(device(), dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("label,shape,groups", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_the_epilogue_and_the_norm_after_it(label, shape, groups, channels_last, dtype, atol, rtol, small_splits):
    x, r, bias, w, b = _inputs(shape, dtype, channels_last)
    out = poisoned_like(x)
    h, stats = bias_add_with_stats(x, bias, r, groups, 0.5, out=out)
    assert h is out and stats is not None and stats.fits(h)
    check_output(h, bias_add_reference(x.float(), bias.float(), r.float(), 0.5),
                 bias_add_reference(x, bias, r, 0.5), atol, rtol, f"{label} epilogue")  # fmt: skip
    y = group_norm(h, groups, w, b, 1e-5, silu=True, stats=stats)
    plain = group_norm(h, groups, w, b, 1e-5, silu=True)
    ref = group_norm_reference(h.float().contiguous(), groups, w.float(), b.float(), 1e-5, silu=True)
    check_output(y, ref, plain, atol, rtol, f"{label} norm with the epilogue's statistics")
    wrong = dataclasses.replace(stats, pmean=stats.pmean + 1.0)
    assert (group_norm(h, groups, w, b, 1e-5, silu=True, stats=wrong).float() - y.float()).abs().max() > 0.1, (
        "the statistics were not used"
    )
    other = h.clone()  # the same values elsewhere: the statistics are not its own
    assert not stats.fits(other)
    torch.testing.assert_close(group_norm(other, groups, w, b, 1e-5, silu=True, stats=wrong), plain)


def test_in_place_and_small_groups_need_none(small_splits):
    x, r, bias, _, _ = _inputs((1, 8, 5, 5), torch.float32, True)  # 8 / 4 channels x 25 pixels: the fused path's
    expected = bias_add_reference(x, bias, r)
    h, stats = bias_add_with_stats(x, bias, r, 4, out=x)
    assert h is x and stats is None
    torch.testing.assert_close(h, expected)


def test_resnet_blocks_hand_their_statistics_on(small_splits):
    """Two ResNet blocks in a row on the kernels (channels-last): with ops.group_stats the first one's output carries
    its statistics, the second one's norm1 takes them off, and the output is the one without them."""
    torch.manual_seed(0)
    blocks = [ResnetBlock2D(16, 16, temb_channels=None, groups=4).to(device()).eval() for _ in range(2)]
    x = torch.randn(1, 16, 12, 12, device=device()).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        outs = {}
        for on in (False, True):
            for block in blocks:
                ops.set_ops(
                    block.to(memory_format=torch.channels_last), dataclasses.replace(ops.TRITON_OPS, group_stats=on)
                )
            first = blocks[0](x)
            assert hasattr(first, ops._GROUP_STATS) == on
            outs[on] = blocks[1](first)
            assert not hasattr(first, ops._GROUP_STATS), "norm1 of the second block did not take them"
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
# The SD VAE decoder's ResNet outputs at 512² and 1024² (channels-last, where the fast path produces them) and a UNet
# one.
REAL_SHAPES = [(1, 512, 64, 64), (1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512), (2, 320, 64, 64),
               (1, 512, 256, 256), (1, 256, 512, 512), (1, 128, 1024, 1024)]  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:])
def test_real_shapes(shape, dtype, atol, rtol):
    """In place on a fresh tensor, as the ResNet block runs it on its convolution's output."""
    x, r, bias, w, b = _inputs(shape, dtype, True)
    expected, torch_sum = bias_add_reference(x.float(), bias.float(), r.float()), bias_add_reference(x, bias, r)
    h, stats = bias_add_with_stats(x, bias, r, 32, out=x)
    assert stats is not None and h.data_ptr() == x.data_ptr()
    check_output(h, expected, torch_sum, atol, rtol, f"{shape} epilogue")
    ref = group_norm_reference(h.float().contiguous(), 32, w.float(), b.float(), 1e-6, silu=True)
    torch_out = group_norm_reference(h.contiguous(), 32, w, b, 1e-6, silu=True)
    check_output(group_norm(h, 32, w, b, 1e-6, silu=True, stats=stats), ref, torch_out, atol, rtol, f"{shape} norm")
