"""benchmarks/ablation.py's variants: each switches off what its name says, or a "+" candidate on, and nothing else
(every op a "-" variant puts back is torch's own, the reference the kernels are tested against;
tests/test_backends.py holds the kernels' ops to torch's inside the tiny models in channels-last)."""

import dataclasses

import pytest
import torch

from benchmarks.ablation import VARIANTS
from diffrt.models import ops

FIELDS = [f.name for f in dataclasses.fields(ops.Ops) if f.name != "name"]
# variant -> the Ops fields it changes against TRITON_OPS, and whether it keeps channels-last
EXPECTED = {
    "diffrt": ((), True),
    "- folded biases": (("fold_bias", "bias_add", "conv2d"), True),
    "- GEGLU kernel": (("geglu",), True),
    "- upsample kernel": (("upsample_nearest",), True),
    "- wide-head attention": (("attention",), True),
    "- attention kernel": (("attention",), True),
    "- GroupNorm kernel": (("group_norm",), True),
    "- channels-last": ((), False),
    "torch ops": (tuple(f for f in FIELDS if getattr(ops.TORCH_OPS, f) != getattr(ops.TRITON_OPS, f)), False),
    "- fused projections": (("fuse_projections",), True),
    "- TAESD epilogues": (("taesd_epilogues",), True),
    "- fused residuals": (("fuse_residuals",), True),
    "- GroupNorm statistics": (("group_stats",), True),
    "- text encoder residuals": (("fuse_text_residuals",), True),
    "+ GEGLU in its GEMM": (("geglu_linear",), True),
    "- upsampling in its convolution": (("upsample_conv",), True),
    "- time projections in one GEMM": (("joint_time_projections",), True),
    "- SDPA for long self-attention": (("attention",), True),
    "- wide-head softmax in one pass": (("attention",), True),
    "- cross-attention K/V once": (("joint_cross_attention",), True),
    "- text encoders side by side": (("concurrent_text_encoders",), True),
    **{
        f"+ {mode} exponentials{long}": (("attention",), True)
        for mode in ("half2", "split", "poly")
        for long in ("", " and long self-attention")
    },
    "+ programmatic dependent launch": ((), True),
    "+ block biases in joint passes": (("joint_block_biases",), True),
    "+ transformer residual in its GEMM": (("group_norm_plus",), True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_switches_off_only_what_it_names(name):
    variant, channels_last = VARIANTS[name]
    changed = {f for f in FIELDS if getattr(variant, f) != getattr(ops.TRITON_OPS, f)}
    fields, layout = EXPECTED[name]
    assert changed == set(fields) and channels_last == layout
    for f in changed - {
        "fold_bias",
        "attention",
        "fuse_projections",
        "taesd_epilogues",
        "fuse_residuals",
        "group_stats",
        "fuse_text_residuals",
        "geglu_linear",  # the candidate switched on: not torch's (which has none) but the kernel's
        "upsample_conv",  # off on the fast path as on torch's: upsampling, then the convolution
        "joint_time_projections",
        "joint_block_biases",  # a candidate switched on
        "group_norm_plus",  # a candidate switched on
    }:
        assert getattr(variant, f) == getattr(ops.TORCH_OPS, f), f"{name}: {f}"


def test_the_narrow_heads_variant_sends_only_wide_heads_to_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "attention_torch", lambda q, k, v: calls.append(("torch", q.shape[-1])))
    monkeypatch.setattr(ops, "attention_triton", lambda q, k, v: calls.append(("kernels", q.shape[-1])))
    attention = VARIANTS["- wide-head attention"][0].attention
    for d in (64, 512):
        q = torch.zeros(1, 1, 4, d)
        attention(q, q, q)
    assert calls == [("kernels", 64), ("torch", 512)]


def test_the_fast_path_sends_only_long_self_attention_with_narrow_heads_to_sdpa(monkeypatch):
    # the ablation's variant without it runs all attention on the kernels
    assert VARIANTS["- SDPA for long self-attention"][0].attention is ops.attention_kernels
    calls = []
    monkeypatch.setattr(ops, "SDPA_SELF_ATTENTION_MIN_QUERIES", 8)
    monkeypatch.setattr(ops, "attention_torch", lambda q, k, v: calls.append("torch"))
    monkeypatch.setattr(ops, "attention_kernels", lambda q, k, v: calls.append("kernels"))
    cases = {  # (queries, keys, head dim) -> where it runs
        (8, 8, 64): "torch",  # long self-attention
        (16, 16, 40): "torch",
        (4, 4, 64): "kernels",  # short
        (8, 77, 64): "kernels",  # cross-attention to the text
        (8, 8, 512): "kernels",  # the VAE's wide head: the kernels' own path for it, not SDPA's slow one
    }
    for sq, sk, d in cases:
        ops.TRITON_OPS.attention(torch.zeros(1, 1, sq, d), torch.zeros(1, 1, sk, d), torch.zeros(1, 1, sk, d))
    assert calls == list(cases.values())


def test_the_exponential_variants_run_the_kernel_in_their_mode_and_restore_it(monkeypatch):
    from diffrt.kernels import attention as kernel

    seen = []
    monkeypatch.setattr(ops, "attention_kernels", lambda q, k, v: seen.append(("all", kernel.EXP2)))
    monkeypatch.setattr(ops, "attention_triton", lambda q, k, v: seen.append(("fast path", kernel.EXP2)))
    q = torch.zeros(1, 1, 4, 64)
    VARIANTS["+ split exponentials"][0].attention(q, q, q)
    VARIANTS["+ half2 exponentials and long self-attention"][0].attention(q, q, q)
    assert seen == [("fast path", "split"), ("all", "half2")] and kernel.EXP2 == "mufu"


def test_the_launch_variant_runs_its_calls_with_programmatic_dependent_launch_and_restores_it():
    from benchmarks.ablation import launches
    from diffrt.kernels import grid_dependency

    with launches("+ programmatic dependent launch"):
        inside = grid_dependency.ENABLED
    with launches("diffrt"):
        plain = grid_dependency.ENABLED
    assert inside and not plain and not grid_dependency.ENABLED
