"""kernels/layer_norm.py against torch: labelled edge shapes on CPU (Triton interpreter), the UNets' transformer
shapes on GPU; and the transformer block with its residuals added in its projections' GEMMs (ops.fuse_residuals)
against the block as diffusers runs it."""

import dataclasses

import pytest
import torch

from diffrt.kernels.layer_norm import layer_norm, layer_norm_reference, supports
from diffrt.models import ops
from diffrt.models.layers import BasicTransformerBlock
from tests.helpers.kernel_checks import DTYPES, TOLERANCES, check_output, device, poisoned_like

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _inputs(shape, dtype, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = torch.randn(shape, generator=g) * 3 + mean
    w, b, add = (torch.randn(c, generator=g) for _ in range(3))
    return (t.to(device(), dtype) for t in (x, w, b, add))


def _check(x, w, b, add, atol, rtol, what):
    outs = (poisoned_like(x.contiguous()), poisoned_like(x.contiguous()))[: 1 + (add is not None)]
    got = layer_norm(x, w, b, 1e-5, add, out=outs)
    got = got if isinstance(got, tuple) else (got,)
    assert all(g is o for g, o in zip(got, outs, strict=True)), "not written into out"
    # fp64: in fp32 torch's own result would be the reference, with no error to compare against
    ref = layer_norm_reference(x.double(), w.double(), b.double(), 1e-5, None if add is None else add.double())
    mine = layer_norm_reference(x, w, b, 1e-5, add)
    ref, mine = (t if isinstance(t, tuple) else (t,) for t in (ref, mine))
    for g, r, m, name in zip(got, ref, mine, ("y", "sum")[: len(got)], strict=True):
        check_output(g, r, m, atol, rtol, f"{what} {name}")


# (label, shape): a width that is no power of two, one row, a row count no block divides, a large mean (the
# two-pass statistics must not cancel), the UNet's widths.
EDGE_SHAPES = [
    ("c20_rows7", (7, 20), 0.0),
    ("one_row_c300", (1, 300), 0.0),
    ("batch2_s13_c40", (2, 13, 40), 0.0),
    ("mean_1000_c64", (9, 64), 1000.0),
    ("c320_s17", (1, 17, 320), 0.0),
]


@pytest.mark.parametrize("with_add", [False, True], ids=["norm", "norm_sum"])
@pytest.mark.parametrize("label,shape,mean", EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_edge_shapes(label, shape, mean, with_add, dtype, atol, rtol):
    if mean and dtype != torch.float32:
        pytest.skip("a mean of 1000 leaves half precision no digits for the deviations")
    x, w, b, add = _inputs(shape, dtype, mean=mean)
    _check(x, w, b, add if with_add else None, atol, rtol, f"{label} {dtype}")


def test_strided_rows_are_read_in_place():
    x, w, b, add = _inputs((6, 48), torch.float32)
    wide = torch.zeros(6, 80, device=x.device)
    wide[:, 8:56] = x
    view = wide[:, 8:56]  # rows 80 apart
    assert supports(view) and not supports(x.t())
    _check(view, w, b, add, *TOLERANCES[torch.float32], "strided rows")
    with pytest.raises(ValueError, match="contiguous channels"):
        layer_norm(x.t(), w[:6], b[:6])
    with pytest.raises(ValueError, match=r"add must have shape \(48,\)"):
        layer_norm(x, w, b, add=add[:5])


# The transformer widths of SD1.5 (320..1280), SD2.1 and SDXL at 512² (tokens x width, CFG batch 2 included).
REAL_SHAPES = [(1, 4096, 320), (2, 4096, 320), (1, 1024, 640), (1, 256, 1280), (2, 1024, 1280)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:])
def test_real_shapes(shape, dtype, atol, rtol):
    x, w, b, add = _inputs(shape, dtype)
    _check(x, w, b, add, atol, rtol, f"{shape} {dtype}")


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_the_block_with_fused_residuals_is_the_block(name):
    """The same weights give the same output with the residuals added by the GEMMs (fp32, so only the summation
    order differs), on torch's LayerNorm and on the kernel."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, heads=2, dim_head=32, context_dim=48).to(device()).eval()
    with torch.no_grad():  # non-zero biases and affine LayerNorms, so that every bias reaches the output
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, context = torch.randn(2, 24, 64, device=device()), torch.randn(2, 7, 48, device=device())
    plain = {"torch": ops.TORCH_OPS, "triton": dataclasses.replace(ops.TRITON_OPS, fuse_residuals=False)}[name]
    ops.set_ops(block, plain)
    with torch.inference_mode():
        want = block(x, context)
        ops.set_ops(block, dataclasses.replace(plain, fuse_residuals=True))
        got = block(x, context)
    assert block.ops.fuse_residuals and not plain.fuse_residuals
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - x).abs().max() > 0.1, "the block did nothing"
