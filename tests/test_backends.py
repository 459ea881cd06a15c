"""Kernel choice per model instance: the triton ops swap GroupNorm/attention inside the real models without changing
their results, and putting one model on them leaves every other model as it was.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there); on the GPU the
`gpu`-marked test runs a real-size UNet in fp16 on the compiled kernels.
"""

import copy
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffrt.backends import BACKENDS, make_backend
from diffrt.models import ops as ops_mod
from diffrt.models.layers import Attention, FeedForward, Transformer2DModel
from diffrt.models.ops import TORCH_OPS, TRITON_OPS, attention_torch, attention_wide_heads, ops_of, set_ops
from diffrt.models.unet import UNet2DConditionModel, UNetConfig
from diffrt.models.vae import AutoencoderKL, AutoencoderKLConfig
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


@pytest.mark.parametrize(
    "preset,h,w", [("tiny-sd15", 8, 12), ("tiny-sd21", 8, 12), ("tiny-sd15", 9, 13)], ids=["sd15", "sd21", "sd15_odd"]
)
def test_channels_last_unet_on_the_kernels_matches_torch(preset, h, w):
    """In channels-last the epilogue kernels run too: the convolutions' biases folded into GroupNorm's shift and the
    residual adds (bias_add), GEGLU's gate, nearest upsampling; SD1.5's 1x1-conv projections, SD2.1's linear ones.
    An odd latent size upsamples to its skip's size rather than 2x (torch's interpolation there)."""
    torch.manual_seed(0)
    reference = UNet2DConditionModel(UNetConfig.preset(preset)).eval().to(memory_format=torch.channels_last)
    on_kernels = set_ops(copy.deepcopy(reference), TRITON_OPS)
    x, t, ctx = _unet_inputs(reference.config, 2, h, w, "cpu", torch.float32)
    x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ours, ref = on_kernels(x, t, ctx), reference(x, t, ctx)
    assert max_rel_error(ours, ref) <= 1e-4
    assert not torch.equal(ours, ref), "the kernels did not run"


def test_channels_last_vae_decoder_on_the_kernels_matches_torch():
    torch.manual_seed(0)
    reference = AutoencoderKL(AutoencoderKLConfig.preset("tiny")).eval().to(memory_format=torch.channels_last)
    on_kernels = set_ops(copy.deepcopy(reference), TRITON_OPS)
    z = torch.randn(1, 4, 3, 4).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ours, ref = on_kernels.decode(z), reference.decode(z)
    assert max_rel_error(ours, ref) <= 1e-4
    assert not torch.equal(ours, ref), "the kernels did not run"


@pytest.mark.parametrize("score_bytes", [None, 4096], ids=["one_chunk", "query_chunks"])
def test_wide_head_attention_matches_sdpa(score_bytes, monkeypatch):
    """The VAE's 512-wide head goes to batched GEMMs with an fp32 softmax, in query chunks when the scores are big."""
    if score_bytes is not None:
        monkeypatch.setattr(ops_mod, "WIDE_HEAD_SCORE_BYTES", score_bytes)  # 4 KB: 16 query rows per chunk of 64 keys
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, n, 320, generator=g) for n in (70, 64, 64))
    ours = attention_wide_heads(q.half(), k.half(), v.half()).float()
    assert ours.shape == (2, 1, 70, 320)
    ref = attention_torch(q, k, v)
    assert (ours - ref).abs().max().item() <= 2e-3


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


def test_feed_forward_with_geglu_in_its_gemm_matches_torch(monkeypatch):
    """The candidate ops.geglu_linear (GEGLU's projection and gate in one Triton GEMM) inside the module, in fp16
    against the fp32 module; the kernel itself runs (half inputs), not the fallback."""
    from diffrt.kernels import geglu_linear as kernel

    calls = []
    monkeypatch.setattr(kernel, "geglu_linear", lambda *a, run=kernel.geglu_linear: calls.append(1) or run(*a))
    torch.manual_seed(0)
    ff = FeedForward(48).to(torch.float16).eval()
    reference = copy.deepcopy(ff).float()
    set_ops(ff, dataclasses.replace(TRITON_OPS, geglu_linear=ops_mod.geglu_linear_triton))
    x = torch.randn(2, 24, 48, dtype=torch.float16)
    with torch.no_grad():
        ours, ref = ff(x).float(), reference(x.float())
    assert calls == [1] and max_rel_error(ours, ref) <= 1e-2


def _on_upsample_conv(reference: torch.nn.Module, monkeypatch):
    """(reference in channels-last, its copy on the fast path's ops.upsample_conv at any size, a latent)."""
    monkeypatch.setattr(ops_mod, "UPSAMPLE_CONV_MIN_PIXELS", 0)  # the tiny decoders' upsamplers are 3x4 to 12x16
    reference = reference.eval().to(memory_format=torch.channels_last)
    assert TRITON_OPS.upsample_conv is ops_mod.upsample_conv_triton
    return reference, set_ops(copy.deepcopy(reference), TRITON_OPS), torch.randn(1, 4, 3, 4).to(
        memory_format=torch.channels_last)  # fmt: skip


def test_vae_decoder_with_upsampling_in_its_convolutions_matches_torch(monkeypatch):
    """ops.upsample_conv (each upsampler and its 3x3 convolution as four 2x2 phase convolutions) in the
    decoder, channels-last, against torch's modules; its cached phase kernels follow a weight changed in place."""
    torch.manual_seed(0)
    reference, on_kernels, z = _on_upsample_conv(AutoencoderKL(AutoencoderKLConfig.preset("tiny")), monkeypatch)
    with torch.no_grad():
        ours, ref = on_kernels.decode(z), reference.decode(z)
        assert max_rel_error(ours, ref) <= 1e-4
        upsamplers = [m for m in on_kernels.modules() if type(m).__name__ == "Upsample2D"]
        ran = upsamplers and all(ops_mod._PHASES in m.conv.__dict__ for m in upsamplers)
        assert ran, "the phase convolutions did not run"
        for model in (on_kernels, reference):  # as a LoRA merge would: in place
            [m for m in model.modules() if type(m).__name__ == "Upsample2D"][0].conv.weight.mul_(1.5)
        assert max_rel_error(on_kernels.decode(z), reference.decode(z)) <= 1e-4


def test_taesd_decoder_with_upsampling_in_its_convolutions_matches_torch(monkeypatch):
    """TAESD's upsamplers and the unbiased 3x3 convolutions after them on ops.upsample_conv."""
    from diffrt.models.taesd import AutoencoderTiny, TAESDConfig

    calls = []
    monkeypatch.setattr(ops_mod, "_phase_weights_of", lambda conv, inner=ops_mod._phase_weights_of: calls.append(1)
                        or inner(conv))  # fmt: skip
    torch.manual_seed(0)
    reference, on_kernels, z = _on_upsample_conv(AutoencoderTiny(TAESDConfig.preset("tiny")), monkeypatch)
    with torch.no_grad():
        assert max_rel_error(on_kernels.decode(z), reference.decode(z)) <= 1e-4
    assert len(calls) == 3  # its three upsamplers


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_unet_with_its_time_projections_in_one_gemm_matches_torch(preset):
    """ops.joint_time_projections (on in TRITON_OPS): every ResNet block's time-embedding projection from one GEMM, none
    of the blocks' own projections called (in inference; with gradients on they run one by one)."""
    torch.manual_seed(0)
    reference = UNet2DConditionModel(UNetConfig.preset(preset)).eval()
    assert TRITON_OPS.joint_time_projections
    candidate = set_ops(copy.deepcopy(reference), TRITON_OPS)
    own_calls = []
    blocks, _ = candidate._time_projections
    for block in blocks:
        block.time_emb_proj.register_forward_hook(lambda *_: own_calls.append(1))
    x, t, ctx = _unet_inputs(reference.config, 2, 8, 8, "cpu", torch.float32)
    c, extra = reference.config, {}
    if c.addition_embed_type == "text_time":  # SDXL: pooled text and six time ids
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        ours, ref = candidate(x, t, ctx, **extra), reference(x, t, ctx, **extra)
    assert len(blocks) > 0 and own_calls == []
    assert max_rel_error(ours, ref) <= 1e-4


@pytest.mark.parametrize("preset", ["tiny-sd15"])
def test_unet_with_its_block_biases_in_joint_passes_gives_the_same_bits_with_fewer_adds(preset):
    """ops.joint_block_biases: the ResNet blocks' bias sums (time projection + conv1's bias, conv2's + the shortcut's)
    for all blocks at once give the fast path's output bit for bit (the same fp16 sums), in fp16 and at batch 2 (the
    CFG batch: the shifts are strided views of one [N, sum of channels] tensor), with all but two of the blocks' adds
    gone."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.preset(preset)).eval().half().to(memory_format=torch.channels_last)
    for name, p in unet.named_parameters():  # biases far from zero, so that a sum taken twice or missed shows
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)
    x, t, ctx = _unet_inputs(unet.config, 2, 8, 8, "cpu", torch.float16)
    x = x.to(memory_format=torch.channels_last)
    c, extra = unet.config, {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, pooled).half(), "time_ids": torch.randn(2, 6).half()}
    outs, adds = [], []
    for joint in (False, True):
        set_ops(unet, dataclasses.replace(TRITON_OPS, joint_block_biases=joint))
        counter = _CountAdds()
        with torch.no_grad(), counter:
            outs.append(unet(x, t, ctx, **extra))
        adds.append(counter.adds)
    blocks, _ = unet._time_projections
    shortcuts = sum(b.conv_shortcut is not None for b in blocks)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
    assert adds[0] - adds[1] == len(blocks) + shortcuts - 2 and shortcuts > 0


class _CountAdds(TorchDispatchMode):
    """How many aten.add calls run inside the block (the Triton kernels launch without dispatching any)."""

    def __init__(self):
        super().__init__()
        self.adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.adds += func is torch.ops.aten.add.Tensor
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("linear", [False, True], ids=["conv-projection", "linear-projection"])
def test_transformer_with_its_residual_in_the_projection_gemm_matches_torch(linear):
    """ops.group_norm_plus (a candidate): the Transformer2D's norm also writes x + proj_out's bias and proj_out's
    GEMM adds into it (SD1.5's 1x1 convolution or SD2.1/SDXL's linear projection), within fp32 rounding of torch's
    module, and for the linear projection without its add kernel; NCHW input takes the plain path."""
    torch.manual_seed(0)
    reference = Transformer2DModel(32, 2, 16, 24, depth=2, groups=8, use_linear_projection=linear).eval()
    for name, p in reference.named_parameters():  # biases far from zero, so that one dropped or added twice shows
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)
    candidate = copy.deepcopy(reference)
    x, ctx = torch.randn(2, 32, 6, 10), torch.randn(2, 7, 24)
    with torch.no_grad():
        ref = reference(x, ctx)
        outs, adds = [], []
        for plus in (None, ops_mod.group_norm_plus_triton):
            set_ops(candidate, dataclasses.replace(TRITON_OPS, group_norm_plus=plus))
            counter = _CountAdds()
            with counter:
                outs.append(candidate(x.to(memory_format=torch.channels_last), ctx))
            adds.append(counter.adds)
        nchw = candidate(x, ctx)
    assert all(max_rel_error(out, ref) <= 1e-4 for out in (*outs, nchw))
    assert adds[0] - adds[1] == (1 if linear else 0) and outs[1].is_contiguous(memory_format=torch.channels_last)


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
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("preset", ["sd15", "sdxl"])
def test_real_unet_fp16_on_the_kernels_matches_torch(preset, layout):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.preset(preset)).cuda().half().eval().to(memory_format=layout)
    x, t, ctx = _unet_inputs(unet.config, 2, 64, 64, "cuda", torch.float16)
    x = x.to(memory_format=layout)
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


@pytest.mark.gpu
@pytest.mark.parametrize("latent", [64, 128], ids=["512px", "1024px"])
def test_real_vae_decoder_fp16_on_the_kernels_matches_torch(latent):
    """The SD decoder in channels-last fp16 on the kernels (the wide-head attention, upsampling, folded biases)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig.preset("sd")).cuda().eval().to(memory_format=torch.channels_last)
    z = torch.randn(1, 4, latent, latent, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref32 = vae.decode(z)
        vae.half()
        ours = set_ops(vae, TRITON_OPS).decode(z.half()).float()
        ref16 = set_ops(vae, TORCH_OPS).decode(z.half()).float()
    ours_err, torch_err = max_rel_error(ours, ref32), max_rel_error(ref16, ref32)
    assert torch.isfinite(ours).all()
    assert ours_err <= max(2 * torch_err, 1e-3), f"kernels {ours_err:.2e} vs torch fp16 {torch_err:.2e}"
