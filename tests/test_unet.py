"""diffrt's UNet2DConditionModel against diffusers' on the same random weights: SD1.x, SD2.x, SDXL, LCM, inpainting.

Tiny configs (every structural feature of each family at 1/10 of the widths) go through a diffusers-saved folder:
diffusers' model is saved with `save_pretrained`, ours is built from the saved `config.json` and loads the saved
safetensors with `strict=True`. The real configs (sd15, sd21, sdxl) run at 8x16 latents on random weights that
both models share (see `_pooled_random_weights`), so that even SDXL fits in a few hundred MB.
"""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.diffusers_configs import SD15, SD21, SDXL
from diffrt.models.unet import PRESETS, UNet2DConditionModel, UNetConfig
from tests.helpers.parity import assert_parity, max_rel_error

diffusers = pytest.importorskip("diffusers")

REAL = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}

# The tiny presets as diffusers would store them: the real file with smaller widths. Head COUNTS stay per family
# (SD1: 8 everywhere, so head width grows with the level; SD2/SDXL: width 16 everywhere, count grows).
TINY = {
    "tiny-sd15": {**SD15, "sample_size": 8, "block_out_channels": [32, 64, 128, 128], "norm_num_groups": 8,
                  "cross_attention_dim": 32},
    "tiny-sd21": {**SD21, "sample_size": 8, "block_out_channels": [32, 64, 128, 128], "norm_num_groups": 8,
                  "attention_head_dim": [2, 4, 8, 8], "cross_attention_dim": 48},
    "tiny-sdxl": {**SDXL, "sample_size": 8, "block_out_channels": [32, 64, 128], "norm_num_groups": 8,
                  "attention_head_dim": [2, 4, 8], "transformer_layers_per_block": [1, 2, 3], "cross_attention_dim": 72,
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24 + 6 * 8},
}  # fmt: skip
# (tiny-sdxl's text widths are its tiny text encoders': 32 + 40 hidden, 24 pooled, as 768 + 1280 and 1280 in SDXL.)

# Variants found in the wild, on the tiny families.
VARIANTS = {
    # LCM (e.g. LCM-Dreamshaper-v7): a guidance-scale embedding through time_embedding.cond_proj.
    "lcm": {**TINY["tiny-sd15"], "time_cond_proj_dim": 16},
    # Inpainting UNets: latents + mask + masked-image latents.
    "inpaint": {**TINY["tiny-sd21"], "in_channels": 9},
    # Distilled SDXLs (SSD-1B style): per-resnet transformer depths, an explicit up path, a shallower mid block.
    "asymmetric": {**TINY["tiny-sdxl"], "transformer_layers_per_block": [1, [1, 2], [2, 1]],
                   "reverse_transformer_layers_per_block": [[2, 1, 1], [1, 2, 1], [1, 1, 1]]},
    "mid-resnet-only": {**TINY["tiny-sd15"], "mid_block_type": "UNetMidBlock2D"},
    "no-mid": {**TINY["tiny-sd21"], "mid_block_type": None},
    "time-embedding-dim": {**TINY["tiny-sd15"], "time_embedding_dim": 96, "layers_per_block": [1, 2, 1, 2]},
}  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """diffusers initialises norms to 1/0; random ones make a swapped weight/bias visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _saved_pair(config: dict, folder, seed: int = 0) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    """(diffusers model, ours loaded from the folder diffusers saved it to)."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel.from_config(config).eval()
    _randomize(ref, seed)
    ref.save_pretrained(folder, safe_serialization=True)
    cfg = UNetConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    ours = UNet2DConditionModel(cfg).eval()
    ours.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours


def _inputs(cfg: UNetConfig, batch: int, hw: tuple[int, int], seed: int, timestep=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, *hw, generator=g),
        # 0-d for one sample; a distinct fractional timestep per sample otherwise.
        "timestep": timestep if timestep is not None else torch.tensor(981.0) if batch == 1 else
        torch.linspace(999.0, 20.5, batch),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
    }  # fmt: skip
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch, pooled, generator=g)
        # original size, crop top-left, target size; different per sample.
        sizes = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
        inputs["time_ids"] = torch.stack([sizes * (1 - 0.25 * i) for i in range(batch)])
    if cfg.time_cond_proj_dim:
        inputs["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=g)
    return inputs


def _run_both(ref, ours, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    extra = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    with torch.inference_mode():
        expected = ref(
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            timestep_cond=inputs.get("timestep_cond"),
            added_cond_kwargs=extra or None,
            return_dict=False,
        )[0]
        actual = ours(**inputs)
    return actual, expected


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            config = TINY.get(name) or VARIANTS[name]
            cache[name] = _saved_pair(config, tmp_path_factory.mktemp(name), seed=len(cache))
        return cache[name]

    return get


# 8x12: non-square, not a multiple of 8 (SD1/2 upsample onto 2x3 from 1x2); 9x13: odd, every level's size is odd.
@pytest.mark.parametrize("hw", [(8, 12), (9, 13)], ids=["8x12", "9x13"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_parity(tiny_pairs, name, batch, hw):
    ref, ours = tiny_pairs(name)
    actual, expected = _run_both(ref, ours, _inputs(ours.config, batch, hw, seed=batch))
    assert actual.shape == (batch, 4, *hw)
    assert_parity(actual, expected, what=f"{name} batch {batch} {hw}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_parity(tiny_pairs, name):
    ref, ours = tiny_pairs(name)
    actual, expected = _run_both(ref, ours, _inputs(ours.config, 2, (8, 12), seed=3))
    assert_parity(actual, expected, what=name)


def test_lcm_timestep_cond_is_used_and_optional(tiny_pairs):
    ref, ours = tiny_pairs("lcm")
    inputs = _inputs(ours.config, 2, (8, 12), seed=4)
    with_cond, _ = _run_both(ref, ours, inputs)
    inputs.pop("timestep_cond")
    actual, expected = _run_both(ref, ours, inputs)  # diffusers skips cond_proj when no condition is given
    assert_parity(actual, expected, what="lcm without timestep_cond")
    assert max_rel_error(with_cond, actual) > 1e-3, "timestep_cond made no difference"


def test_bf16_matches_diffusers_bf16(tmp_path):
    """The dtype path (fp32 sinusoids cast to the model's dtype, SDXL's fp32 time ids) follows diffusers'."""
    ref, ours = _saved_pair(TINY["tiny-sdxl"], tmp_path, seed=11)
    ref.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    inputs = _inputs(ours.config, 2, (9, 13), seed=10)
    inputs = {k: v.bfloat16() if k not in ("timestep", "time_ids") else v for k, v in inputs.items()}
    actual, expected = _run_both(ref, ours, inputs)
    assert actual.dtype == torch.bfloat16
    assert_parity(actual, expected, tol=1e-3, what="bf16")


@pytest.mark.parametrize(
    "timestep",
    [torch.tensor(500), torch.tensor([500]), torch.tensor([999, 1]), torch.tensor([999.0, 0.25]), 999, 37.5],
    ids=["0d-int", "1-elem", "per-sample-int", "per-sample-float", "python-int", "python-float"],
)
def test_timestep_forms(tiny_pairs, timestep):
    ref, ours = tiny_pairs("tiny-sd15")
    actual, expected = _run_both(ref, ours, _inputs(ours.config, 2, (8, 8), seed=5, timestep=timestep))
    assert_parity(actual, expected, what=f"timestep {timestep!r}")


def test_traces_without_graph_breaks():
    """No Python branching on tensor values and no host sync: dynamo captures the forward as one graph.

    On a two-level SDXL-style config with LCM's condition (every code path of the forward, at the least tracing cost):
    levels with and without attention, down/upsampling onto odd sizes, added text/time conditioning, cond_proj.
    """
    cfg = dataclasses.replace(
        UNetConfig.preset("tiny-sdxl"),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=1,
        num_attention_heads=(2, 4),
        time_cond_proj_dim=16,
    )
    torch.manual_seed(0)
    model = UNet2DConditionModel(cfg).eval()
    inputs = _inputs(cfg, 2, (9, 13), seed=6)
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        assert_parity(compiled(**inputs), model(**inputs), tol=0.0, what="dynamo-traced forward")


@pytest.mark.parametrize("name", list(REAL))
def test_presets_match_diffusers_configs(name):
    assert UNetConfig.preset(name) == UNetConfig.from_diffusers(REAL[name])
    assert UNetConfig.preset(f"tiny-{name}") == UNetConfig.from_diffusers(TINY[f"tiny-{name}"])


def test_preset_structure():
    """The features the tiny presets must keep from their families."""
    sd15, sd21, sdxl = (UNetConfig.preset(f"tiny-{n}") for n in ("sd15", "sd21", "sdxl"))
    heads_width = [c // h for c, h in zip(sd15.block_out_channels, sd15.num_attention_heads, strict=True)]
    assert not sd15.use_linear_projection and len(set(sd15.num_attention_heads)) == 1 and len(set(heads_width)) > 1
    for cfg in (sd21, sdxl):
        assert cfg.use_linear_projection
        assert len({c // h for c, h in zip(cfg.block_out_channels, cfg.num_attention_heads, strict=True)}) == 1
    assert len(sdxl.block_out_channels) == 3 and sdxl.down_block_types[0] == "DownBlock2D"
    assert len(set(sdxl.transformer_layers_per_block[1:])) == 2 and sdxl.addition_embed_type == "text_time"
    assert set(PRESETS) >= {"sd15", "sd21", "sdxl", "tiny-sd15", "tiny-sd21", "tiny-sdxl"}


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_keys_and_shapes(name):
    """The real architectures' state_dicts equal diffusers' key for key and shape for shape (on the meta device)."""
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(REAL[name])
        ours = UNet2DConditionModel(UNetConfig.preset(name))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(set(expected) ^ set(actual)) == []
    assert actual == expected


def _pooled_random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for a real-size model in a fraction of its memory (SDXL: 10 GB in fp32 otherwise).

    Every parameter is a view into a shared pool of random numbers, one pool per fan-in scaled like PyTorch's
    default init (uniform, +-1/sqrt(fan_in)), each parameter at its own offset: distinct values for every tensor, so a
    swapped or misrouted weight still changes the output, but the pools total a few hundred MB.
    """
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)

    def kind(key: str, shape: torch.Size) -> str | int:
        return ("norm" if key.endswith("weight") else "bias") if len(shape) == 1 else math.prod(shape[1:])

    slack = 1 << 16
    pools = {}
    for group in {kind(k, s) for k, s in shapes.items()}:
        n = max(math.prod(s) for k, s in shapes.items() if kind(k, s) == group) + slack
        values = torch.rand(n, generator=g) * 2 - 1
        pools[group] = 1 + 0.2 * values if group == "norm" else 0.2 * values if group == "bias" else values / group**0.5
    weights, counts = {}, {}
    for key, shape in shapes.items():
        group = kind(key, shape)
        counts[group] = counts.get(group, 0) + 1
        offset = counts[group] * 7919 % slack
        weights[key] = pools[group][offset : offset + math.prod(shape)].view(shape)
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_config_parity(name):
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(REAL[name])
        ours = UNet2DConditionModel(UNetConfig.from_diffusers(REAL[name]))
    weights = _pooled_random_weights(ours, seed=7)
    ours.load_state_dict(weights, strict=True, assign=True)
    ref.load_state_dict(weights, strict=True, assign=True)
    ref.eval()
    ours.eval()
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in ref.parameters())
    # 8x16 latents: SD1/2 go down to 1x2, SDXL to 2x4; batch 2 with a different timestep per sample.
    actual, expected = _run_both(ref, ours, _inputs(ours.config, 2, (8, 16), seed=8))
    assert_parity(actual, expected, what=f"{name} ({params / 1e6:.0f}M parameters)")


def test_config_rejections():
    cases = {
        "block types ['SimpleCrossAttnDownBlock2D'] are not supported": {
            **SD15,
            "down_block_types": ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"] * 2,
        },
        "mid_block_type 'UNetMidBlock2DSimpleCrossAttn' is not supported": {
            **SD15,
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        },
        "class_embed_type='timestep' is not supported": {**SD15, "class_embed_type": "timestep"},
        "addition_embed_type 'text' is not supported": {**SD15, "addition_embed_type": "text"},
        "needs addition_time_embed_dim and projection_class_embeddings_input_dim": {
            **SD15,
            "addition_embed_type": "text_time",
        },
        "unknown UNet2DConditionModel config keys ['attention_heads']": {**SD15, "attention_heads": 8},
        "config is for 'AutoencoderKL'": {**SD15, "_class_name": "AutoencoderKL"},
        "do not split into num_attention_heads=7": {**SD15, "attention_head_dim": 7},
        "up_block_types has 3 entries but block_out_channels has 4": {
            **SD15,
            "up_block_types": SD15["up_block_types"][:3],
        },
        "must also give reverse_transformer_layers_per_block": {**SD15, "transformer_layers_per_block": [[1, 2]] * 4},
        "is not a multiple of norm_num_groups=32": {**SD15, "block_out_channels": [320, 640, 1280, 1000]},
        "only_cross_attention=[False, True, False, False] is not supported": {
            **SD15,
            "only_cross_attention": [False, True, False, False],
        },
    }
    for message, config in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
            UNetConfig.from_diffusers(config)
    with pytest.raises(ValueError, match="unknown UNet preset 'sd3'"):
        UNetConfig.preset("sd3")


def test_forward_rejections(tiny_pairs):
    _, xl = tiny_pairs("tiny-sdxl")
    inputs = _inputs(xl.config, 1, (8, 8), seed=9)
    with pytest.raises(ValueError, match="pass text_embeds and time_ids"):
        xl(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    _, sd = tiny_pairs("tiny-sd15")
    sd_inputs = _inputs(sd.config, 1, (8, 8), seed=9)
    with pytest.raises(ValueError, match="no added conditioning"):
        sd(**sd_inputs, text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"])
    with pytest.raises(ValueError, match="no time_cond_proj_dim"):
        sd(**sd_inputs, timestep_cond=torch.zeros(1, 16))


def test_config_is_normalised_per_level():
    cfg = dataclasses.replace(UNetConfig.preset("sdxl"), layers_per_block=[2, 2, 2])
    assert cfg == UNetConfig.preset("sdxl")
    assert UNetConfig.preset("sd15").num_attention_heads == (8, 8, 8, 8)
    assert UNetConfig.preset("sd21").time_embed_dim == 1280


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_controlnet_residuals_are_added_as_diffusers_adds_them(name, tmp_path):
    """ControlNet's residuals (one per skip, one for the mid block) enter through the same arguments as diffusers'."""
    ref, ours = _saved_pair(TINY[name], tmp_path)
    inputs = _inputs(ours.config, 2, (8, 12), seed=3)
    with torch.inference_mode():
        skips = []  # the skips' shapes, from a hook on diffusers' model: conv_in, then every down-block output
        hook = ref.conv_in.register_forward_hook(lambda m, a, out: skips.append(out.shape))
        hooks = [
            b.register_forward_hook(lambda m, a, out: skips.extend(t.shape for t in out[1])) for b in ref.down_blocks
        ]
        _run_both(ref, ours, inputs)
        for h in [hook, *hooks]:
            h.remove()
    g = torch.Generator().manual_seed(4)
    down = tuple(torch.randn(s, generator=g) for s in skips)
    mid_shape = (2, ours.config.block_out_channels[-1], *skips[-1][-2:])
    mid = torch.randn(mid_shape, generator=g)
    extra = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    with torch.inference_mode():
        expected = ref(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                       added_cond_kwargs=extra or None, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]  # fmt: skip
        actual = ours(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = ours(**inputs)
    assert_parity(actual, expected)
    assert max_rel_error(plain, expected) > 1e-2, "the residuals changed nothing"
    with pytest.raises(ValueError, match=f"{len(down) - 1} down-block residuals for this UNet's {len(down)} skips"):
        ours(**inputs, down_block_additional_residuals=down[:-1])
