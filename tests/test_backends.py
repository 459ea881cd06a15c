"""Kernel choice per model instance: the triton ops swap GroupNorm/attention inside the real models without changing
their results, and putting one model on them leaves every other model as it was.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there); on the GPU the
`gpu`-marked test runs a real-size UNet in fp16 on the compiled kernels.
"""

import copy

import pytest
import torch

from diffrt.backends import BACKENDS, make_backend
from diffrt.models.layers import Attention
from diffrt.models.ops import TORCH_OPS, TRITON_OPS, ops_of, set_ops
from diffrt.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers.parity import max_rel_error

pytest.importorskip("triton")


def _unet_inputs(cfg: UNetConfig, batch: int, h: int, w: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    return x, torch.tensor(500.0, device=device), ctx


def test_unet_group_norms_on_the_kernel_match_torch():
    torch.manual_seed(0)
    reference = UNet2DConditionModel(UNetConfig.preset("tiny-sd15")).eval()
    on_kernels = set_ops(copy.deepcopy(reference), TRITON_OPS)
    assert ops_of(on_kernels) == {"triton"} and ops_of(reference) == {"torch"}  # the copy only
    x, t, ctx = _unet_inputs(reference.config, 1, 8, 12, "cpu", torch.float32)
    with torch.no_grad():
        ours, ref = on_kernels(x, t, ctx), reference(x, t, ctx)
    assert max_rel_error(ours, ref) <= 1e-4
    assert not torch.equal(ours, ref), "the kernels did not run (bit-identical to torch's GroupNorm)"


def test_attention_module_on_the_kernel_matches_torch():
    torch.manual_seed(0)
    attn = Attention(80, context_dim=48, heads=2, dim_head=40).to(torch.bfloat16).eval()
    reference = copy.deepcopy(attn).float()
    set_ops(attn, TRITON_OPS)
    x, ctx = torch.randn(2, 24, 80, dtype=torch.bfloat16), torch.randn(2, 77, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        ours = attn(x, ctx).float()
        ref = reference(x.float(), ctx.float())
    assert max_rel_error(ours, ref) <= 2e-2  # bf16 inputs and weights against the fp32 module


def test_set_ops_can_go_back_to_torch():
    unet = set_ops(UNet2DConditionModel(UNetConfig.preset("tiny-sd15")), TRITON_OPS)
    assert ops_of(set_ops(unet, TORCH_OPS)) == {"torch"}


def test_unknown_backend_is_named():
    with pytest.raises(
        ValueError, match="unknown backend .tvm.; choose one of: torch, triton, cuda-graph, onnxruntime, tensorrt"
    ):
        make_backend("tvm")
    assert [make_backend(name).name for name in BACKENDS] == list(BACKENDS)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_real_unet_fp16_on_the_kernels_matches_torch(preset):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.preset(preset)).cuda().half().eval()
    x, t, ctx = _unet_inputs(unet.config, 2, 64, 64, "cuda", torch.float16)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra = {
            "text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
            "time_ids": torch.tensor([[512, 512, 0, 0, 512, 512]] * 2, device="cuda", dtype=torch.float16),
        }
    with torch.no_grad():
        ours = set_ops(unet, TRITON_OPS)(x, t, ctx, **extra).float()
        ref16 = set_ops(unet, TORCH_OPS)(x, t, ctx, **extra).float()
        ref32 = unet.float()(x.float(), t, ctx.float(), **{k: v.float() for k, v in extra.items()})
    ours_err, torch_err = max_rel_error(ours, ref32), max_rel_error(ref16, ref32)
    assert ours_err <= max(2 * torch_err, 1e-3), f"kernels {ours_err:.2e} vs torch fp16 {torch_err:.2e}"
