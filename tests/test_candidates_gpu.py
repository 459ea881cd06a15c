"""The fast path's latest optimizations (`-m gpu`, on the device): with attention's projections in one GEMM
(ops.fuse_projections), TAESD's epilogues (ops.taesd_epilogues), the transformer blocks' and the text encoder's
residuals added in their projections' GEMMs (ops.fuse_residuals, ops.fuse_text_residuals) and the GroupNorm statistics
taken by the ResNet blocks' residual adds (ops.group_stats), the upsamplers as phase convolutions (ops.upsample_conv)
and the UNet's time projections in one GEMM (ops.joint_time_projections), the CUDA-graph pipeline is as close to the
fp32 reference
(torch ops, the same weights) as it is without them, never NaN, at a square and a non-square size. The first two give
the same images bit for bit or nearly (the same dot products); the residuals round their sums in another order, which a
random tiny model amplifies to a few hundredths in 0..1 either way (run 13, benchmarks/NOTES_kernels.md), so each is
held to the reference rather than to the other. Every cross-attention's keys and values from one GEMM per generation
(ops.joint_cross_attention) is among the latest too. The candidate not on the fast path (GEGLU's projection and gate
in one GEMM, ops.geglu_linear: slower on the H200) is held to the reference the same way, against the fast path
without it; the fast path's long self-attention on torch's SDPA is held to the reference against the kernels alone."""

import dataclasses

import pytest
import torch

import diffrt
from diffrt.backends.cuda_graph import CudaGraphBackend
from diffrt.models import ops
from diffrt.models.ops import TORCH_OPS, TRITON_OPS
from diffrt.models.taesd import AutoencoderTiny, TAESDConfig

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
LATEST = ("fuse_projections", "taesd_epilogues", "fuse_residuals", "fuse_text_residuals", "group_stats",
          "upsample_conv", "joint_time_projections", "joint_cross_attention")  # fmt: skip
# each latest one as torch's ops have it: off (False, or None for an op that replaces a pair of layers)
WITHOUT = dataclasses.replace(TRITON_OPS, name="triton-previous", **{f: getattr(TORCH_OPS, f) for f in LATEST})
CANDIDATES = {
    "geglu_linear": ops.geglu_linear_triton,
    "joint_block_biases": True,
    "group_norm_plus": ops.group_norm_plus_triton,
}
EXACT = {"joint_block_biases"}  # the same fp16 sums in fewer passes: the same images bit for bit


def pipeline(backend, taesd: bool, dtype=torch.float16) -> diffrt.Pipeline:
    pipe = diffrt.Pipeline.from_pretrained("tiny-sd21", device="cuda", dtype=dtype, backend=backend)
    if taesd:
        torch.manual_seed(0)
        vae = AutoencoderTiny(TAESDConfig((16,) * 4, (16,) * 4, (1, 1, 1, 1), (1, 1, 1, 1)))
        components = dataclasses.replace(pipe.components, vae=vae)
        pipe = diffrt.Pipeline.from_components(components, device="cuda", dtype=dtype, backend=backend)
    return pipe


def errors_against_fp32(ops_with, ops_without, taesd: bool, height: int, width: int) -> tuple[float, float, float]:
    """(max abs error in 0..1 against the fp32 reference with `ops_with`, the same without, their difference): the
    CUDA-graph pipeline's images of one prompt and seed, never NaN, not blank."""
    kw = {"height": height, "width": width, "steps": 2, "seed": 4, "output_type": "pt"}
    reference = pipeline("torch", taesd, torch.float32)("a photo of a cat", **kw).float()
    without = pipeline(CudaGraphBackend(ops_without), taesd)("a photo of a cat", **kw).float()
    got = pipeline(CudaGraphBackend(ops_with), taesd)("a photo of a cat", **kw).float()
    assert torch.isfinite(got).all() and got.std() > 1e-3
    err, err_without = ((x - reference).abs().max().item() for x in (got, without))
    return err, err_without, (got - without).abs().max().item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("taesd", [False, True], ids=["vae", "taesd"])
@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_the_fast_path_is_as_close_to_fp32_as_without_them(taesd, height, width, monkeypatch):
    assert all(getattr(TRITON_OPS, name) for name in LATEST)
    monkeypatch.setattr(ops, "UPSAMPLE_CONV_MIN_PIXELS", 0)  # the tiny VAE's upsamplers are 8x8 to 32x48
    err, err_without, diff = errors_against_fp32(TRITON_OPS, WITHOUT, taesd, height, width)
    print(f"taesd={taesd} {height}x{width}: max abs error in 0..1 against fp32 {err:.4f}, without them "
          f"{err_without:.4f}, difference {diff:.4f}")  # fmt: skip
    assert err <= 1.25 * err_without + 2 / 255, (err, err_without)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "candidate,taesd",
    [("geglu_linear", False), ("joint_block_biases", False), ("group_norm_plus", False)],
    ids=["geglu_linear", "joint_block_biases", "group_norm_plus"],
)  # TAESD too, where a candidate touches the decoder
@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_each_candidate_is_as_close_to_fp32_as_the_fast_path(candidate, taesd, height, width, monkeypatch):
    assert not getattr(TRITON_OPS, candidate)  # still a candidate: when it goes on, LATEST takes it
    monkeypatch.setattr(ops, "UPSAMPLE_CONV_MIN_PIXELS", 0)  # the tiny VAE's upsamplers are 8x8 to 32x48
    on = dataclasses.replace(TRITON_OPS, name=f"triton+{candidate}", **{candidate: CANDIDATES[candidate]})
    err, err_fast, diff = errors_against_fp32(on, TRITON_OPS, taesd, height, width)
    print(f"{candidate} taesd={taesd} {height}x{width}: max abs error in 0..1 against fp32 {err:.4f}, "
          f"fast path {err_fast:.4f}, difference {diff:.4f}")  # fmt: skip
    assert err <= 1.25 * err_fast + 2 / 255, (err, err_fast)
    assert candidate not in EXACT or diff == 0.0, diff


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_sdpa_for_long_self_attention_is_as_close_to_fp32_as_the_kernels(height, width, monkeypatch):
    """The fast path's long self-attention on torch's SDPA (ops.attention_triton), with its threshold at 0 so that every
    self-attention of the tiny UNet (at most 96 queries) takes it, as SD's 16384-query layers at 1024² do, against the
    same pipeline with all its attention on the kernels (ops.attention_kernels)."""
    monkeypatch.setattr(ops, "UPSAMPLE_CONV_MIN_PIXELS", 0)
    monkeypatch.setattr(ops, "SDPA_SELF_ATTENTION_MIN_QUERIES", 0)
    sdpa_calls = []
    sdpa = ops.attention_torch
    monkeypatch.setattr(ops, "attention_torch", lambda q, k, v: sdpa_calls.append(q.shape) or sdpa(q, k, v))
    kernels_only = dataclasses.replace(TRITON_OPS, name="triton-kernels-only", attention=ops.attention_kernels)
    err, err_kernels, diff = errors_against_fp32(TRITON_OPS, kernels_only, False, height, width)
    # the fast path's images must come from SDPA (else they would equal the kernels' and prove nothing); the fp32
    # reference runs on TORCH_OPS, whose attention is the unpatched function
    assert sdpa_calls, "no self-attention took SDPA"
    print(f"sdpa long self-attention {height}x{width}: max abs error in 0..1 against fp32 {err:.4f}, kernels only "
          f"{err_kernels:.4f}, difference {diff:.4f}")  # fmt: skip
    assert err <= 1.25 * err_kernels + 2 / 255, (err, err_kernels)
