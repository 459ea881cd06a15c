"""kernels/group_norm.py against torch: labelled edge shapes on CPU (Triton interpreter), UNet/VAE shapes on GPU."""

import pytest
import torch

from benchmarks.kernel_shapes import all_unet_shapes, all_vae_norm_shapes
from diffrt.kernels import group_norm as gn_mod
from diffrt.kernels._autotune import make_early_prune
from diffrt.kernels.group_norm import group_norm, group_norm_reference
from tests.helpers.kernel_checks import DTYPES, TOLERANCES, check_output, device, poisoned_like

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


@pytest.fixture
def small_splits(monkeypatch):
    # Let small CPU shapes reach several spatial chunks (with a short last one) on the split path, folded over
    # several finalize iterations.
    monkeypatch.setattr(gn_mod, "MIN_SPLIT_ROWS", 16)
    monkeypatch.setattr(gn_mod, "FINALIZE_BLOCK", 2)


def _inputs(shape, groups, dtype, channels_last=False, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g) * std + mean
    w = torch.randn(c, generator=g) * 0.5 + 1.0
    b = torch.randn(c, generator=g) * 0.5
    dev = device()
    x, w, b = x.to(dev, dtype), w.to(dev, dtype), b.to(dev, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format)
    return x, w, b


def _run_and_check(x, groups, w, b, atol, rtol, what, eps=1e-5, **kw):
    out = poisoned_like(x)
    y = group_norm(x, groups, w, b, eps, out=out, **{k: v for k, v in kw.items()})
    assert y is out
    algo = kw.pop("algorithm", None)
    assert algo in (None, "auto", "fused", "split")
    # fp32 reference on a contiguous copy (torch's CPU channels-last GroupNorm loses precision at large means).
    res = kw.get("residual")
    ref = group_norm_reference(
        x.float().contiguous(), groups, w.float(), b.float(), eps, silu=kw.get("silu", False),
        residual=None if res is None else res.float(),
    )  # fmt: skip
    torch_out = group_norm_reference(x.contiguous(), groups, w, b, eps, silu=kw.get("silu", False), residual=res)
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last), "output must keep x's channels-last format"
    return check_output(y, ref, torch_out, atol, rtol, what)


# ---------------------------------------------------------------------------------------------- CPU: edge shapes
# (label, shape, groups): odd H*W, channels per group not a power of two, channels not a multiple of the tile.
EDGE_SHAPES = [
    ("odd_hw_cg5", (2, 20, 7, 9), 4),
    ("sd_cg10_hw65", (1, 40, 5, 13), 4),
    ("one_group", (1, 6, 11, 3), 1),
    ("group_per_channel", (2, 8, 3, 5), 8),
    ("hw_1", (3, 16, 1, 1), 4),
]


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("algorithm", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dtypes_layouts(dtype, atol, rtol, algorithm, channels_last, small_splits):
    x, w, b = _inputs((2, 20, 7, 9), 4, dtype, channels_last, mean=3.0, std=2.0)
    _run_and_check(x, 4, w, b, atol, rtol, f"odd_hw_cg5 {algorithm}", silu=True, algorithm=algorithm)


@pytest.mark.parametrize(("label", "shape", "groups"), EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("algorithm", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_edge_shapes(label, shape, groups, algorithm, channels_last, small_splits):
    atol, rtol = TOLERANCES[torch.float16]
    x, w, b = _inputs(shape, groups, torch.float16, channels_last)
    _run_and_check(x, groups, w, b, atol, rtol, f"{label} {algorithm}", silu=True, algorithm=algorithm)


@pytest.mark.parametrize(("dtype", "mean", "std"), [(torch.float32, 1e4, 1e3), (torch.float16, 1e3, 20.0)])
@pytest.mark.parametrize("algorithm", ["fused", "split"])
def test_large_mean_and_variance(dtype, mean, std, algorithm, small_splits):
    # sum(x^2) - sum(x)^2 / n in fp32 would lose every digit here; Chan's update keeps them.
    atol, rtol = TOLERANCES[dtype]
    x, w, b = _inputs((2, 24, 9, 7), 6, dtype, mean=mean, std=std)
    _run_and_check(x, 6, w, b, atol, rtol, f"large mean {algorithm}", algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_residual_full_with_sum(algorithm, channels_last, small_splits):
    atol, rtol = TOLERANCES[torch.float16]
    x, w, b = _inputs((2, 20, 7, 9), 4, torch.float16, channels_last)
    r, _, _ = _inputs((2, 20, 7, 9), 4, torch.float16, not channels_last, seed=1)  # the other layout: any strides
    y, hsum = group_norm(x, 4, w, b, silu=True, residual=r, return_sum=True, algorithm=algorithm)
    ref = group_norm_reference(x.float(), 4, w.float(), b.float(), silu=True, residual=r.float())
    check_output(y, ref, group_norm_reference(x, 4, w, b, silu=True, residual=r), atol, rtol, "residual")
    torch.testing.assert_close(hsum, x + r, atol=0, rtol=0)


@pytest.mark.parametrize("algorithm", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+residual"])
def test_sum_plus_is_added_to_the_sum_and_not_normalised(algorithm, channels_last, with_residual, small_splits):
    # The Transformer2D's norm also writes x + its output projection's bias, the residual GEMM's C matrix.
    atol, rtol = TOLERANCES[torch.float16]
    x, w, b = _inputs((2, 20, 7, 9), 4, torch.float16, channels_last)
    r = _inputs((2, 20, 7, 9), 4, torch.float16, channels_last, seed=1)[0] if with_residual else None
    plus = torch.randn(20, generator=torch.Generator().manual_seed(5)).to(x.device, x.dtype) * 3
    y, hsum = group_norm(x, 4, w, b, residual=r, return_sum=True, sum_plus=plus, algorithm=algorithm)
    h = x if r is None else x + r
    check_output(y, group_norm_reference(h.float(), 4, w.float(), b.float()), group_norm_reference(h, 4, w, b),
                 atol, rtol, "sum_plus")  # fmt: skip
    h32 = x.float() if r is None else x.float() + r.float()  # one rounding of the whole sum, as the kernel's
    torch.testing.assert_close(hsum, (h32 + plus.float()[:, None, None]).half(), atol=0, rtol=0)
    assert hsum.stride() == y.stride()
    _, want = group_norm_reference(x, 4, w, b, residual=r, return_sum=True, sum_plus=plus)
    torch.testing.assert_close(hsum.float(), want.float(), atol=2e-3, rtol=2e-3)


def test_sum_plus_needs_a_channel_vector_and_return_sum():
    x, w, b = _inputs((1, 8, 4, 4), 4, torch.float16)
    with pytest.raises(ValueError, match="sum_plus must be a"):
        group_norm(x, 4, w, b, sum_plus=torch.zeros(8, dtype=x.dtype, device=x.device))
    with pytest.raises(ValueError, match="sum_plus must be a"):
        group_norm(x, 4, w, b, return_sum=True, sum_plus=torch.zeros(4, dtype=x.dtype, device=x.device))


@pytest.mark.parametrize("algorithm", ["fused", "split"])
def test_residual_per_channel(algorithm, small_splits):
    # The ResNet block adds its time embedding [N, C] before norm2.
    atol, rtol = TOLERANCES[torch.float16]
    x, w, b = _inputs((2, 20, 7, 9), 4, torch.float16)
    temb = torch.randn(2, 20, generator=torch.Generator().manual_seed(3)).to(x.device, x.dtype)
    _run_and_check(x, 4, w, b, atol, rtol, "temb", silu=True, residual=temb[:, :, None, None], algorithm=algorithm)
    y = group_norm(x, 4, w, b, silu=True, residual=temb, algorithm=algorithm)  # [N, C] is accepted too
    ref = group_norm_reference(x.float(), 4, w.float(), b.float(), silu=True, residual=temb.float()[:, :, None, None])
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_split_long_chunks(channels_last, monkeypatch):
    # One spatial chunk per sample spanning several tiles: exercises the running (Chan / Welford) combination
    # inside one stats program, with a partial last tile (675 = 2 x 256 + 163 positions).
    monkeypatch.setattr(gn_mod, "MIN_SPLIT_ROWS", 4096)
    atol, rtol = TOLERANCES[torch.float32]
    x, w, b = _inputs((2, 8, 25, 27), 2, torch.float32, channels_last, mean=5.0, std=3.0)
    x = x + torch.linspace(-20, 20, 25 * 27, device=x.device).view(1, 1, 25, 27)  # per-tile means differ
    _run_and_check(x, 2, w, b, atol, rtol, "long chunks", silu=True, algorithm="split")


@pytest.mark.parametrize("algorithm", ["fused", "split"])
def test_no_affine_no_silu_3d(algorithm, small_splits):
    atol, rtol = TOLERANCES[torch.float32]
    x, _, _ = _inputs((2, 12, 37), 3, torch.float32)
    y = group_norm(x, 3, algorithm=algorithm)
    ref = group_norm_reference(x, 3)
    check_output(y, ref, ref, atol, rtol, "no affine, [N, C, L]")


def test_fp32_weights_with_fp16_input():
    atol, rtol = TOLERANCES[torch.float16]
    x, w, b = _inputs((1, 20, 7, 9), 4, torch.float16)
    y = group_norm(x, 4, w.float(), b.float(), silu=True)
    ref = group_norm_reference(x.float(), 4, w.float(), b.float(), silu=True)
    check_output(y, ref, group_norm_reference(x, 4, w, b, silu=True), atol, rtol, "fp32 affine")


def test_autotune_pruning():
    # Called as Triton calls early_config_prune (never under the interpreter, so test it directly).
    by_layout = make_early_prune(gn_mod._prune_by_layout)
    both = gn_mod._NCHW_CONFIGS + gn_mod._NHWC_CONFIGS
    assert by_layout(both, {"sxc": 1, "C": 320, "S": 4096}, HAS_RES=False) == gn_mod._NHWC_CONFIGS
    assert by_layout(both, {"sxc": 4096, "C": 320, "S": 4096}, HAS_RES=False) == gn_mod._NCHW_CONFIGS
    fused = make_early_prune(gn_mod._prune_fused)(gn_mod._FUSED_CONFIGS, {"CG": 80, "C": 2560}, SILU=True)
    assert fused and all(c.kwargs["BLOCK_S"] * 128 <= 8192 for c in fused)


def test_interpreter_autotunes_one_config():
    if not gn_mod._INTERPRET:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    for k in (gn_mod._group_norm_fused_kernel, gn_mod._group_norm_stats_kernel, gn_mod._group_norm_apply_kernel):
        assert len(k.configs) == 1


# ----------------------------------------------------------------------------------------------- input validation
def test_rejects_bad_inputs():
    x, w, b = _inputs((2, 20, 7, 9), 4, torch.float16)
    with pytest.raises(ValueError, match=r"num_groups 6 does not divide the 20 channels"):
        group_norm(x, 6, w, b)
    with pytest.raises(ValueError, match=r"x has dtype torch.float64; allowed: float32, float16, bfloat16"):
        group_norm(x.double(), 4)
    with pytest.raises(ValueError, match=r"x is on meta; group_norm runs on CUDA tensors"):
        group_norm(torch.empty(2, 20, 7, 9, device="meta"), 4)
    with pytest.raises(ValueError, match=r"weight is on meta but x is on"):
        group_norm(x, 4, torch.empty(20, device="meta"), b)
    with pytest.raises(ValueError, match=r"weight must have shape \(20,\) for 20 channels, got \(16,\)"):
        group_norm(x, 4, w[:16], b)
    with pytest.raises(ValueError, match=r"residual must have x's shape"):
        group_norm(x, 4, w, b, residual=x[:, :, :3])
    with pytest.raises(ValueError, match=r"residual has dtype torch.float32 but x has torch.float16"):
        group_norm(x, 4, w, b, residual=x.float())
    with pytest.raises(ValueError, match=r"must have shape \[N, C, \*spatial\]"):
        group_norm(x[0, 0, 0], 4)
    with pytest.raises(ValueError, match=r"spatial dims cannot be read with one stride"):
        group_norm(x[:, :, :, ::2], 4)
    with pytest.raises(ValueError, match=r"algorithm 'fast' is not one of"):
        group_norm(x, 4, algorithm="fast")
    with pytest.raises(ValueError, match=r"return_sum=True needs a residual or a sum_plus"):
        group_norm(x, 4, return_sum=True)
    with pytest.raises(ValueError, match=r"out must match x"):
        group_norm(x, 4, out=x.float())


# ---------------------------------------------------------------------------------------- GPU: the real shapes
UNET_NORMS, _ = all_unet_shapes()
VAE_NORMS = all_vae_norm_shapes()
REAL = [pytest.param(s, id=f"unet_{s.label}") for s in UNET_NORMS] + [
    pytest.param(s, id=f"vae_{s.label}") for s in VAE_NORMS if s not in UNET_NORMS
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", REAL)
def test_real_shapes_fp16(shape):
    atol, rtol = TOLERANCES[torch.float16]
    x, w, b = _inputs((1, shape.channels, shape.height, shape.width), shape.groups, torch.float16)
    _run_and_check(x, shape.groups, w, b, atol, rtol, shape.label, eps=shape.eps, silu=shape.silu)


GPU_VARIANTS = [s for s in UNET_NORMS if s.silu and (s.channels, s.height) in {(320, 64), (1280, 8), (960, 128)}]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("algorithm", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", GPU_VARIANTS, ids=[s.label for s in GPU_VARIANTS])
def test_real_shapes_variants(shape, dtype, atol, rtol, algorithm, channels_last):
    x, w, b = _inputs((1, shape.channels, shape.height, shape.width), shape.groups, dtype, channels_last, mean=2.0)
    _run_and_check(x, shape.groups, w, b, atol, rtol, shape.label, eps=shape.eps, silu=True, algorithm=algorithm)
