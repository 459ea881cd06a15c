"""ops.joint_cross_attention (diffrt.models.cross_attention_kv): every cross-attention layer's keys and values of the
text from one GEMM, once per generation; the same images as projecting them per layer and step."""

import copy
import dataclasses

import pytest
import torch

import diffrt
from diffrt.backends.eager import EagerBackend
from diffrt.models.ops import TORCH_OPS, set_ops
from diffrt.models.unet import UNet2DConditionModel, UNetConfig
from diffrt.roles import Conditioning
from tests.helpers.parity import max_rel_error

JOINT = dataclasses.replace(TORCH_OPS, name="torch+joint-cross-attention", joint_cross_attention=True)


def _inputs(config: UNetConfig):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, config.cross_attention_dim, generator=g)
    extra = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and six time ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return x, torch.tensor(500.0), text, extra


def _count_layer_projections(layers: list) -> list:
    """A list that grows by one whenever one of `layers`' own k or v projections runs."""
    calls = []
    for layer in layers:
        for linear in (layer.to_k, layer.to_v):
            linear.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_one_projection_serves_every_step_and_matches_the_layers_own(preset):
    torch.manual_seed(0)
    reference = UNet2DConditionModel(UNetConfig.preset(preset)).eval()
    joint = set_ops(copy.deepcopy(reference), JOINT)
    own_calls = _count_layer_projections(joint._cross_attention.layers)
    x, t, text, extra = _inputs(reference.config)
    with torch.no_grad():
        kv = joint.cross_attention_kv(text)
        steps = [joint(x + i, t, text, **extra, cross_attention_kv=kv) for i in range(3)]
        inline = joint(x, t, text, **extra)  # no kv given: the call projects the text itself, in one GEMM
        expected = [reference(x + i, t, text, **extra) for i in range(3)]
    assert len(kv.by_layer) == len(joint._cross_attention.layers) > 0 and own_calls == []
    for got, want in zip([*steps, inline], [*expected, expected[0]], strict=True):
        assert max_rel_error(got, want) <= 1e-5
    assert "_diffrt_cross_attention_kv" not in text.__dict__  # the caller's tensor carries nothing afterwards


def test_the_layers_weights_are_views_of_the_one_joint_tensor():
    """After the join each layer's k/v weight lives in the joint tensor (LoRA's in-place writes reach the GEMM) and
    no layer keeps a joint k/v tensor of its own (no second copy of the weights)."""
    torch.manual_seed(0)
    reference = UNet2DConditionModel(UNetConfig.preset("tiny-sd15")).eval()
    joint = set_ops(copy.deepcopy(reference), dataclasses.replace(JOINT, fuse_projections=True))
    x, t, text, _ = _inputs(reference.config)
    with torch.no_grad():
        layer = joint._cross_attention.layers[0]
        layer._kv(text)  # a joint of that layer's own first, as a fast path without the option makes
        assert layer._kv.weight is not None
        joint(x, t, text)
        storage = joint._cross_attention.joint.weight.untyped_storage().data_ptr()
        assert all(
            p.weight.untyped_storage().data_ptr() == storage
            for lay in joint._cross_attention.layers
            for p in (lay.to_k, lay.to_v)
        )
        assert all(lay._kv.weight is None for lay in joint._cross_attention.layers)
        for model in (joint, reference):  # an in-place change to one layer, as a LoRA merge makes
            model._cross_attention.layers[1].to_v.weight.mul_(1.5)
        assert max_rel_error(joint(x, t, text), reference(x, t, text)) <= 1e-5


def test_keys_and_values_of_another_text_are_refused():
    unet = set_ops(UNet2DConditionModel(UNetConfig.preset("tiny-sd15")).eval(), JOINT)
    x, t, text, _ = _inputs(unet.config)
    with torch.no_grad():
        kv = unet.cross_attention_kv(text.clone())
        with pytest.raises(ValueError, match="projected from another text tensor than encoder_hidden_states"):
            unet(x, t, text, cross_attention_kv=kv)


def test_without_the_option_nothing_is_prepared():
    unet = UNet2DConditionModel(UNetConfig.preset("tiny-sd15")).eval()
    assert unet.cross_attention_kv(torch.zeros(1, 77, unet.config.cross_attention_dim)) is None


def test_the_prepared_projection_is_no_input():
    cond = Conditioning(embeds=torch.zeros(1, 77, 8), prepared=object())
    assert list(cond.tensors()) == ["embeds"]


@pytest.mark.parametrize(
    "preset,sampler,steps,guidance", [("tiny-sd15", "lcm", 4, 1.0), ("tiny-sdxl", "euler", 3, 5.0)]
)
def test_a_generation_projects_the_text_once(preset, sampler, steps, guidance):
    """The pipeline prepares the conditioning once per sampler loop (CFG's doubled batch included): one projection for
    all steps, and the images of projecting per layer and step."""
    kw = {"steps": steps, "sampler": sampler, "guidance_scale": guidance, "height": 64, "width": 64, "seed": 2,
          "output_type": "pt"}  # fmt: skip
    reference = diffrt.Pipeline.from_pretrained(preset)("a red cube", **kw)
    pipe = diffrt.Pipeline.from_pretrained(preset, backend=EagerBackend("torch+joint", JOINT))
    unet = pipe.components.unet
    projections, project = [], unet._cross_attention
    unet._cross_attention = lambda text: projections.append(text.shape) or project(text)
    own_calls = _count_layer_projections(project.layers)
    got = pipe("a red cube", **kw)
    assert len(projections) == 1 and own_calls == []
    assert projections[0][0] == (2 if guidance > 1 else 1)
    assert (got - reference).abs().max() <= 1e-5
