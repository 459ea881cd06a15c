"""AutoencoderTiny (TAESD/TAESDXL): parity with diffusers on the same random weights from a diffusers-saved folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffrt.models.taesd import PRESETS, AutoencoderTiny, TAESDConfig
from tests.helpers.parity import assert_parity

diffusers = pytest.importorskip("diffusers")

# madebyollin/taesd and madebyollin/taesdxl config.json, as diffusers 0.30+ reports them (the two are identical:
# same architecture and latent API, different weights).
TAESD_CONFIG = {
    "_class_name": "AutoencoderTiny",
    "_diffusers_version": "0.30.0",
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
}
TAESDXL_CONFIG = dict(TAESD_CONFIG)
TINY_CONFIG = {  # our `tiny` preset as a diffusers config
    "encoder_block_out_channels": [16] * 4,
    "decoder_block_out_channels": [16] * 4,
    "num_encoder_blocks": [1, 1, 1, 1],
    "num_decoder_blocks": [1, 1, 1, 1],
}


def test_presets_equal_public_configs():
    assert TAESDConfig.from_diffusers(TAESD_CONFIG) == PRESETS["taesd"]
    assert TAESDConfig.from_diffusers(TAESDXL_CONFIG) == PRESETS["taesdxl"]
    assert TAESDConfig.from_diffusers(TINY_CONFIG) == PRESETS["tiny"]
    # The oldest published form (diffusers 0.20) lacks the later keys; defaults give the same config.
    old = {k: v for k, v in TAESD_CONFIG.items() if k not in ("shift_factor", "upsample_fn")}
    assert TAESDConfig.from_diffusers(old) == PRESETS["taesd"]
    assert PRESETS["taesd"].vae_scale_factor == 8


def _pair(config: dict, path) -> tuple[torch.nn.Module, AutoencoderTiny]:
    """Random diffusers AutoencoderTiny saved to `path`, and ours built and strictly loaded from that folder."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ref.save_pretrained(path)
    ours = AutoencoderTiny(TAESDConfig.from_diffusers(json.loads((path / "config.json").read_text())))
    ours.load_state_dict(load_file(path / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours.eval()


def _check_parity(ref, ours: AutoencoderTiny, batch: int, height: int = 64, width: int = 96) -> None:
    gen = torch.Generator().manual_seed(batch)
    lc, f = ours.config.latent_channels, ours.config.vae_scale_factor
    image = torch.rand(batch, 3, height, width, generator=gen) * 2 - 1
    # Spread wider than the tanh soft clamp's knee at 3, so the clamp is exercised.
    latents = 3 * torch.randn(batch, lc, height // f, width // f, generator=gen)
    with torch.no_grad():
        encoded = ours.encode(image)
        assert encoded.shape == (batch, lc, height // f, width // f)
        assert_parity(encoded, ref.encode(image).latents, what="encode")
        decoded = ours.decode(latents)
        assert decoded.shape == (batch, 3, height, width)
        assert_parity(decoded, ref.decode(latents).sample, what="decode")
        assert_parity(ours.scale_latents(latents), ref.scale_latents(latents), what="scale_latents")
        assert_parity(ours.unscale_latents(latents), ref.unscale_latents(latents), what="unscale_latents")


@pytest.mark.parametrize("batch", [1, 2])
def test_real_taesd_parity(tmp_path, batch):
    ref, ours = _pair(TAESD_CONFIG, tmp_path)
    assert sum(p.numel() for p in ours.decoder.parameters()) == 1_222_531
    _check_parity(ref, ours, batch)
    with torch.no_grad():  # forward: encode, 8-bit latents, decode (as diffusers)
        image = torch.rand(batch, 3, 32, 48) * 2 - 1
        assert_parity(ours(image), ref(image).sample, what="forward")


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_parity(tmp_path, batch):
    ref, ours = _pair(TINY_CONFIG, tmp_path)
    _check_parity(ref, ours, batch)


def test_tiny_parity_variant(tmp_path):
    """SiLU, bilinear upsampling, 16 latent channels (the TAESD3/TAEF1 shape), other magnitude and shift."""
    config = {
        **TINY_CONFIG,
        "act_fn": "silu",
        "upsample_fn": "bilinear",
        "latent_channels": 16,
        "latent_magnitude": 5,
        "latent_shift": 0.25,
    }
    ref, ours = _pair(config, tmp_path)
    _check_parity(ref, ours, batch=2, height=48, width=32)


def test_decode_soft_clamps_latents(tmp_path):
    """Latents far past 3 decode like latents at 3 (tanh(z / 3) * 3 saturates), as in diffusers."""
    _, ours = _pair(TINY_CONFIG, tmp_path)
    z = torch.full((1, 4, 4, 4), 3.0)
    with torch.no_grad():
        assert_parity(ours.decode(z * 1e3), ours.decode(z * 1e4), what="saturated decode")
        assert not torch.allclose(ours.decode(z * 1e3), ours.decode(z / 3))


def test_scale_latents_clamps():
    model = AutoencoderTiny(PRESETS["tiny"])
    z = torch.tensor([-100.0, -3.0, 0.0, 3.0, 100.0])
    assert model.scale_latents(z).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert model.unscale_latents(model.scale_latents(z)).tolist() == [-3.0, -3.0, 0.0, 3.0, 3.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "AutoencoderKL"}, "config is for 'AutoencoderKL', not 'AutoencoderTiny'"),
        ({"num_encoder_blocks": [1, 3, 3]}, "encoder_block_out_channels .* and num_encoder_blocks .* equally long"),
        ({"decoder_block_out_channels": [64, 64, 32, 32]}, "needs one width for all levels"),
        ({"act_fn": "elu"}, "act_fn 'elu' is not supported"),
        ({"upsample_fn": "area"}, "upsample_fn 'area' is not supported"),
        ({"use_quant_conv": True}, "unsupported AutoencoderTiny config keys \\['use_quant_conv'\\]"),
    ],
)
def test_from_diffusers_rejects(change, message):
    with pytest.raises(ValueError, match=message):
        TAESDConfig.from_diffusers({**TAESD_CONFIG, **change})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown TAESD preset 'taesd3'"):
        TAESDConfig.preset("taesd3")


@pytest.mark.parametrize("preset", ["tiny", "taesd"])
def test_epilogues_are_the_plain_modules(preset):
    """ops.taesd_epilogues (a convolution's bias, the block's residual and ReLU in one bias_add pass, nearest 2x
    upsampling on its op) computes what the plain modules compute: fp32 on torch's ops, and fp16 channels-last on the
    Triton kernels (the interpreter on a CPU) within twice the plain kernels' own fp16 error."""
    import dataclasses

    from diffrt.models.ops import TORCH_OPS, TRITON_OPS, set_ops
    from diffrt.models.taesd import AutoencoderTiny, TAESDConfig

    torch.manual_seed(0)
    model = AutoencoderTiny(TAESDConfig.preset(preset)).eval()
    image = torch.rand(2, 3, 32, 32) * 2 - 1  # small: the fp16 half runs in Triton's interpreter
    with torch.inference_mode():
        plain = model.encode(image), model.decode(model.encode(image))
        set_ops(model, dataclasses.replace(TORCH_OPS, taesd_epilogues=True))
        z = model.encode(image)
        torch.testing.assert_close(z, plain[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(z), plain[1], atol=1e-5, rtol=1e-5)
        half = model.half().to(memory_format=torch.channels_last)
        x = image.half().to(memory_format=torch.channels_last)
        set_ops(half, TRITON_OPS)
        want = half.decode(half.encode(x))
        set_ops(half, dataclasses.replace(TRITON_OPS, taesd_epilogues=True))
        got = half.decode(half.encode(x))
    assert want.std() > 5e-3, "a flat output would prove little"
    # against the fp32 modules: the epilogues' error stays within twice the plain kernels' own fp16 error
    err, own = ((t.float() - plain[1]).abs().max().item() for t in (got, want))
    assert err <= 2 * own + 1e-3, (err, own)
