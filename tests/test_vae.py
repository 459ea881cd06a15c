"""AutoencoderKL: parity with diffusers on the same random weights, loaded from a diffusers-saved folder."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from diffrt.models.vae import PRESETS, AutoencoderKL, AutoencoderKLConfig, rename_deprecated_attention_keys
from tests.helpers.parity import assert_parity

diffusers = pytest.importorskip("diffusers")

_DOWN, _UP = ["DownEncoderBlock2D"] * 4, ["UpDecoderBlock2D"] * 4

# The public vae/config.json files, as published (older ones lack the keys added since; defaults fill them).
SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": _DOWN,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": _UP,
}
SD21_CONFIG = {**SD15_CONFIG, "_diffusers_version": "0.8.0", "sample_size": 768}  # stabilityai/stable-diffusion-2-1
SDXL_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "_name_or_path": "../sdxl-vae/",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": _DOWN,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": _UP,
}
TINY_CONFIG = {  # our `tiny` preset as a diffusers config
    "block_out_channels": [16, 32, 64, 64],
    "down_block_types": _DOWN,
    "up_block_types": _UP,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def test_presets_equal_public_configs():
    assert AutoencoderKLConfig.from_diffusers(SD15_CONFIG) == PRESETS["sd"]
    assert AutoencoderKLConfig.from_diffusers(SD21_CONFIG) == PRESETS["sd"]
    sdxl = AutoencoderKLConfig.from_diffusers(SDXL_CONFIG)
    assert sdxl == PRESETS["sdxl"] and sdxl.scaling_factor == 0.13025 and sdxl.shift_factor is None
    assert PRESETS["sd"].scaling_factor == 0.18215 and PRESETS["sd"].vae_scale_factor == 8
    assert AutoencoderKLConfig.from_diffusers(TINY_CONFIG) == PRESETS["tiny"]


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """diffusers initialises GroupNorm to weight 1, bias 0; random values make a swapped or skipped norm visible."""
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data = 1 + 0.2 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=gen)


def _pair(config: dict, path, logvar_bias: float = 0.0) -> tuple[torch.nn.Module, AutoencoderKL]:
    """Random diffusers AutoencoderKL saved to `path`, and ours built and strictly loaded from that folder."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    _randomize_norms(ref, torch.Generator().manual_seed(1))
    if logvar_bias:  # push logvar past the clamp at 20, so that the clamp is exercised
        ref.quant_conv.bias.data[ref.config.latent_channels :] += logvar_bias
    ref.save_pretrained(path)
    ours = AutoencoderKL(AutoencoderKLConfig.from_diffusers(json.loads((path / "config.json").read_text())))
    ours.load_state_dict(load_file(path / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours.eval()


def _check_parity(ref, ours: AutoencoderKL, batch: int, height: int = 64, width: int = 96) -> None:
    gen = torch.Generator().manual_seed(batch)
    lc, f = ours.config.latent_channels, ours.config.vae_scale_factor
    image = torch.rand(batch, 3, height, width, generator=gen) * 2 - 1
    latents = torch.randn(batch, lc, height // f, width // f, generator=gen)
    with torch.no_grad():
        expected, actual = ref.encode(image).latent_dist, ours.encode(image)
        assert actual.mean.shape == (batch, lc, height // f, width // f)
        assert_parity(actual.mean, expected.mean, what="encode mean")
        assert_parity(actual.logvar, expected.logvar, what="encode logvar")
        assert_parity(actual.std, expected.std, what="encode std")
        decoded = ours.decode(latents)
        assert decoded.shape == (batch, 3, height, width)
        assert_parity(decoded, ref.decode(latents).sample, what="decode")


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_parity(tmp_path, batch):
    ref, ours = _pair(TINY_CONFIG, tmp_path)
    _check_parity(ref, ours, batch)
    with torch.no_grad():  # forward = decode(posterior mean), as diffusers' forward(sample_posterior=False)
        image = torch.rand(batch, 3, 32, 40) * 2 - 1
        assert_parity(ours(image), ref(image).sample, what="forward")


def test_tiny_parity_variant(tmp_path):
    """No mid-block attention, no quant convs, 3 levels, 8 latent channels, and a shift_factor that round-trips."""
    config = {
        **TINY_CONFIG,
        "block_out_channels": [16, 32, 32],
        "down_block_types": _DOWN[:3],
        "up_block_types": _UP[:3],
        "latent_channels": 8,
        "mid_block_add_attention": False,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.0609,
        "scaling_factor": 1.5305,
    }
    ref, ours = _pair(config, tmp_path)
    assert ours.quant_conv is None and ours.post_quant_conv is None and ours.config.shift_factor == 0.0609
    _check_parity(ref, ours, batch=2, height=48, width=32)


def test_group_norm_eps_equal(tmp_path):
    """A wrong eps hides under the parity tolerance on random inputs, so compare it per module."""
    ref, ours = _pair(TINY_CONFIG, tmp_path)
    expected = {n: m.eps for n, m in ref.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    actual = {n: m.eps for n, m in ours.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert actual == expected and len(actual) == 36  # 14 in the encoder, 22 in the decoder


def test_logvar_clamp(tmp_path):
    ref, ours = _pair(TINY_CONFIG, tmp_path, logvar_bias=1e4)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        actual, expected = ours.encode(image), ref.encode(image).latent_dist
    assert (actual.logvar == 20.0).all(), "logvar far above 20 must be clamped to 20"
    assert_parity(actual.logvar, expected.logvar, what="clamped logvar")
    assert_parity(actual.std, expected.std, what="std of clamped logvar")


def test_sample_matches_diffusers(tmp_path):
    """The same generator gives the same posterior sample as diffusers (single generator and one per image)."""
    ref, ours = _pair(TINY_CONFIG, tmp_path)
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        actual, expected = ours.encode(image), ref.encode(image).latent_dist
    one = actual.sample(torch.Generator().manual_seed(7))
    assert_parity(one, expected.sample(torch.Generator().manual_seed(7)), what="sample")
    assert not torch.equal(one, actual.mode()), "a sample must differ from the mode"
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    per_image = actual.sample(gens)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    assert_parity(
        per_image, diffusers.utils.torch_utils.randn_tensor(expected.mean.shape, gens) * expected.std + expected.mean
    )
    assert torch.equal(actual.mode(), actual.mean)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        actual.sample([torch.Generator() for _ in range(3)])


def test_deprecated_attention_names_load(tmp_path):
    """Checkpoints saved before diffusers 0.14 name the attention query/key/value/proj_attn."""
    ref, ours = _pair(TINY_CONFIG, tmp_path)
    old = {}
    for k, v in ref.state_dict().items():
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    fresh = AutoencoderKL(ours.config)
    fresh.load_state_dict(rename_deprecated_attention_keys(old), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "AutoencoderTiny"}, "config is for 'AutoencoderTiny', not 'AutoencoderKL'"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"] + _DOWN[1:]}, "block types \\['AttnDownEncoderBlock2D'\\]"),
        ({"up_block_types": _UP[:3]}, "up_block_types has 3 entries but block_out_channels has 4"),
        ({"act_fn": "gelu"}, "act_fn 'gelu' is not supported"),
        ({"norm_num_groups": 48}, "128 is not a multiple of norm_num_groups=48"),
        ({"norm_type": "spatial"}, "unsupported AutoencoderKL config keys \\['norm_type'\\]"),
    ],
)
def test_from_diffusers_rejects(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKLConfig.from_diffusers({**SD15_CONFIG, **change})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown AutoencoderKL preset 'sd3'"):
        AutoencoderKLConfig.preset("sd3")


@pytest.mark.slow
def test_real_sd_vae_parity(tmp_path):
    """The real SD VAE config (83M parameters) at 64x96 pixels / 8x12 latents."""
    ref, ours = _pair(SD15_CONFIG, tmp_path)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 83_653_863
    for batch in (1, 2):
        _check_parity(ref, ours, batch)


def test_sdxl_preset_is_sd_architecture():
    assert replace(PRESETS["sdxl"], scaling_factor=0.18215) == PRESETS["sd"]
