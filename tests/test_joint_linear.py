"""Attention's projections in one GEMM (diffrt.models.joint_linear, ops.fuse_projections): the same outputs as the
layers one by one, and the layers stay the parameters of record: state dicts load into the joint tensor, LoRA-style
in-place copies reach it, a dtype change rebuilds it, training still gets a gradient per parameter."""

import dataclasses

import pytest
import torch
from torch import nn

import diffrt
from diffrt.models import ops
from diffrt.models.joint_linear import JointLinear
from diffrt.models.layers import Attention, SpatialSelfAttention

FUSED = dataclasses.replace(ops.TORCH_OPS, fuse_projections=True)


def attention(context_dim: int | None, fused: bool, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    module = Attention(64, context_dim, heads=4, dim_head=16).eval()
    module.ops = FUSED if fused else ops.TORCH_OPS
    return module


def inputs(context_dim: int | None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 64, generator=g)
    return x, None if context_dim is None else torch.randn(2, 11, context_dim, generator=g)


@pytest.mark.parametrize("context_dim", [None, 48], ids=["self-attention", "cross-attention"])
def test_fused_is_the_layers_one_by_one(context_dim):
    x, context = inputs(context_dim)
    plain, fused = attention(context_dim, False), attention(context_dim, True)
    fused.load_state_dict(plain.state_dict())
    with torch.inference_mode():
        want, got = plain(x, context), fused(x, context)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    joint = fused._qkv if context_dim is None else fused._kv
    assert joint.weight is not None and joint._linked(), "the joint GEMM ran"
    assert list(fused.state_dict()) == list(plain.state_dict()), "the parameters of record keep their names"


def test_loading_and_in_place_copies_reach_the_joint_tensor():
    x, _ = inputs(None)
    fused, other = attention(None, True), attention(None, False, seed=5)
    with torch.inference_mode():
        fused(x)  # joins
    fused.load_state_dict(other.state_dict())  # copies into the views
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), other(x), atol=1e-6, rtol=1e-6)
        delta = torch.randn_like(other.to_v.weight)
        fused.to_v.weight.copy_(fused.to_v.weight + delta)  # as diffrt.lora fuses a LoRA
        other.to_v.weight.copy_(other.to_v.weight + delta)
        torch.testing.assert_close(fused(x), other(x), atol=1e-6, rtol=1e-6)
    assert fused._qkv._linked()


def test_a_dtype_change_rebuilds_the_joint_tensor():
    x, _ = inputs(None)
    fused, plain = attention(None, True), attention(None, False)
    with torch.inference_mode():
        fused(x)
        fused.to(torch.float64)
        plain.to(torch.float64)
        assert not fused._qkv._linked()
        torch.testing.assert_close(fused(x.double()), plain(x.double()))
    assert fused._qkv.weight.dtype == torch.float64 and fused._qkv._linked()


def test_training_gets_a_gradient_per_parameter():
    x, _ = inputs(None)
    fused = attention(None, True).train()
    fused(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (fused.to_q.weight, fused.to_v.weight))


def test_the_vae_attention_with_biases():
    torch.manual_seed(0)
    plain, fused = SpatialSelfAttention(64, groups=8).eval(), SpatialSelfAttention(64, groups=8).eval()
    fused.load_state_dict(plain.state_dict())
    fused.ops = FUSED
    x = torch.randn(1, 64, 6, 5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
    assert fused._qkv.bias is not None and fused._qkv._linked()


def test_layers_with_and_without_a_bias_run_one_by_one():
    a, b = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)
    joint = JointLinear(a, b)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        ya, yb = joint(x)
    assert not joint.joinable and joint.weight is None
    torch.testing.assert_close(ya, a(x).detach())
    torch.testing.assert_close(yb, b(x).detach())


def test_the_text_encoders_projections_fused_are_the_layers_one_by_one():
    """CLIP's q, k and v (with biases) in one GEMM: the same hidden states and pooled output."""
    from diffrt.models.clip import CLIPAttention, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=16)  # fmt: skip
    plain = CLIPTextModel(cfg).eval()
    fused = ops.set_ops(CLIPTextModel(cfg).eval(), FUSED)
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 64, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want, got = plain(ids), fused(ids)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    attentions = [m for m in fused.modules() if isinstance(m, CLIPAttention)]
    assert len(attentions) == 2 and all(m._qkv._linked() for m in attentions), "the joint GEMM ran"


def test_a_pipeline_on_fused_projections_gives_the_same_image():
    """The tiny SD2.1 pipeline end to end (text encoder, UNet, VAE), eager, its attention's projections fused."""
    from diffrt.backends.eager import EagerBackend

    plain = diffrt.Pipeline.from_pretrained("tiny-sd21")
    fused = diffrt.Pipeline.from_pretrained("tiny-sd21", backend=EagerBackend("torch-fused", FUSED))
    kw = {"height": 64, "width": 64, "steps": 2, "seed": 3, "output_type": "pt"}
    want, got = plain("a cat", **kw), fused("a cat", **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    attentions = [m for m in fused.components.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(m.ops.fuse_projections for m in attentions)
    assert any(m._qkv._linked() for m in attentions) and any(m._kv._linked() for m in attentions), "fused GEMMs ran"
    from diffrt.models.clip import CLIPAttention

    text = [m for m in fused.components.text_encoder.modules() if isinstance(m, CLIPAttention)]
    assert text and all(m._qkv._linked() for m in text), "the text encoder's fused GEMMs ran"


@pytest.mark.parametrize("context_dim", [None, 48], ids=["self-attention", "cross-attention"])
def test_the_attention_kernel_reads_the_joint_output_views(context_dim):
    """fp16 on the Triton kernels (the interpreter on a CPU): q, k, v as strided views of one [B, S, 3C] output give
    what the separate, contiguous projections give."""
    x, context = inputs(context_dim)
    x, context = x.half(), None if context is None else context.half()
    plain, fused = attention(context_dim, False).half(), attention(context_dim, True).half()
    plain.ops, fused.ops = ops.TRITON_OPS, dataclasses.replace(ops.TRITON_OPS, fuse_projections=True)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x, context), plain(x, context), atol=2e-3, rtol=2e-3)
