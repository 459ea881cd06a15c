"""Single-file LDM/SGM checkpoints: written from diffusers/transformers-saved random weights through the test-side
reverse mapping (tests/ldm_keys.py), they must load to the same weights and the same outputs as the diffusers folder,
for SD1, SD2 (v-prediction) and SDXL tiny configs; the family and configs come from the keys alone (checked on the
real configs too, with meta tensors); malformed files are refused with the key named."""

import dataclasses
import os
import shutil

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffrt.loading import CheckpointError, load_model, read_checkpoint_components
from diffrt.loading.single_file import split_single_file
from tests.helpers.ldm_keys import clip_to_ldm, clip_to_open_clip, unet_to_ldm, vae_to_ldm
from tests.helpers.loading_fixtures import UNETS, make_pipeline, write_single_file
from tests.helpers.parity import assert_parity

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """{family: (pipeline folder, single file, {component: (reference module, config)})}"""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        ref = make_pipeline(family, str(root / "pipe"))
        out[family] = (str(root / "pipe"), write_single_file(family, ref, str(root / "model.safetensors")), ref)
    return out


def _path(checkpoints, family) -> str:
    return os.path.join(os.path.dirname(checkpoints[family][0]), "model.safetensors")


def _run(name: str, module, family: str, ref: bool):
    """One forward on fixed inputs: batch 2, non-square latents; reference modules take diffusers' arguments."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if name == "unet":
            cfg = UNETS[family]
            x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([999.0, 20.0])
            ctx = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
            cond = {}
            if family == "sdxl":
                cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6, generator=g) * 512}
            if ref:
                return [module(x, t, ctx, added_cond_kwargs=cond or None).sample]
            return [module(x, t, ctx, **cond)]
        if name == "vae":
            img = torch.randn(2, 3, 16, 24, generator=g)
            lat = torch.randn(2, 4, 3, 5, generator=g)
            if ref:
                return [module.encode(img).latent_dist.mean, module.decode(lat).sample]
            return [module.encode(img).mean, module.decode(lat)]
        ids = torch.randint(3, 999, (2, 77), generator=g)
        ids[0, 10:], ids[1, 40:] = 999, 999  # end-of-text padding, as the tokenizer pads SD prompts
        if ref:
            r = module(ids, output_hidden_states=True)
            pooled = r.text_embeds if hasattr(r, "text_embeds") else r.pooler_output
            return [r.last_hidden_state, r.hidden_states[-2], pooled]
        o = module(ids)
        return [o.last_hidden_state, o.hidden_state, o.pooled]


def _same(a, b) -> bool:
    """Config values equal, where one value for all levels equals the same value listed per level."""
    a = list(a) if isinstance(a, (list, tuple)) else a
    b = list(b) if isinstance(b, (list, tuple)) else b
    if isinstance(a, list) != isinstance(b, list):
        return set(a if isinstance(a, list) else b) == {b if isinstance(a, list) else a}
    return a == b


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_equals_diffusers_folder(checkpoints, family):
    folder, _, ref = checkpoints[family]
    single = read_checkpoint_components(_path(checkpoints, family))
    assert single.kind == "single file" and single.family == family
    assert set(single.components) == set(ref)
    for name, (ref_module, ref_config) in ref.items():
        comp = single.components[name]
        # the same tensors under the same names (CLIP keys as transformers' historic text_model.* layout)
        want = {("text_model." + k if name.startswith("text") and not k.startswith(("text_", "text_model")) else k): v
                for k, v in ref_module.state_dict().items()}  # fmt: skip
        assert set(comp.state_dict) == set(want), name
        for k, v in want.items():
            assert torch.equal(comp.state_dict[k], v), f"{name}: {k}"
        # the inferred config agrees with the saved one on everything that shapes the model
        for k, v in comp.config.items():
            if k in ref_config and k not in ("sample_size", "projection_dim", "_class_name"):
                assert _same(v, ref_config[k]), (name, k, v, ref_config[k])
        # the modules built from the file and from the folder are the same (config and weights), and compute what
        # the reference computes
        ours = load_model(_path(checkpoints, family), name)
        from_folder = load_model(folder, name)
        a, b = dataclasses.asdict(ours.config), dataclasses.asdict(from_folder.config)
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "sample_size"}  # a resolution hint only
        assert not diff, (name, diff)
        folder_sd = from_folder.state_dict()
        assert all(torch.equal(v, folder_sd[k]) for k, v in ours.state_dict().items()), name
        expected = _run(name, ref_module, family, ref=True)
        for i, (a, e) in enumerate(zip(_run(name, ours, family, ref=False), expected, strict=True)):
            assert_parity(a, e, what=f"{family} {name} output {i}")


def test_sd2_is_v_prediction_and_drops_the_last_open_clip_layer(checkpoints):
    ckpt = read_checkpoint_components(_path(checkpoints, "sd2"))
    assert ckpt.scheduler_config["prediction_type"] == "v_prediction"
    assert ckpt.components["text_encoder"].config["num_hidden_layers"] == 2  # the file has 3 resblocks
    assert "text_projection.weight" not in ckpt.components["text_encoder"].state_dict
    assert any("penultimate" in r for r in ckpt.reasons)
    assert read_checkpoint_components(_path(checkpoints, "sd1")).scheduler_config["prediction_type"] == "epsilon"


def test_v_pred_and_ztsnr_markers(checkpoints, tmp_path):
    sd = load_file(_path(checkpoints, "sdxl"))
    sd.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    save_file(sd, tmp_path / "x.safetensors")
    sched = read_checkpoint_components(tmp_path / "x.safetensors").scheduler_config
    assert sched["prediction_type"] == "v_prediction" and sched["rescale_betas_zero_snr"] is True


def test_family_comes_from_keys_not_the_file_name(checkpoints, tmp_path):
    misnamed = {"sdxl": "v1-5-pruned-emaonly.safetensors", "sd1": "sd_xl_base_1.0.ckpt", "sd2": "sd15.pt"}
    for family, name in misnamed.items():
        shutil.copy(_path(checkpoints, family), tmp_path / name)
        assert read_checkpoint_components(tmp_path / name).family == family


def test_ckpt_pickle_single_file(checkpoints, tmp_path):
    sd = load_file(_path(checkpoints, "sd1"))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, path)
    with pytest.raises(CheckpointError, match="refusing to load a pickle .* allow_pickle=True"):
        load_model(path, "unet")
    ours = load_model(path, "unet", allow_pickle=True)
    ref = load_model(_path(checkpoints, "sd1"), "unet")
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_component_only_files(checkpoints, tmp_path):
    sd = load_file(_path(checkpoints, "sd2"))
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, tmp_path / "unet.safetensors")
    ckpt = read_checkpoint_components(tmp_path / "unet.safetensors")
    assert ckpt.family == "sd2" and list(ckpt.components) == ["unet"]  # from proj_in's rank, no text encoder
    assert load_model(tmp_path / "unet.safetensors").config.use_linear_projection  # the only component: no name
    # a bare LDM VAE (vae-ft-mse-840000-ema-pruned style: no first_stage_model. prefix)
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, tmp_path / "vae.safetensors")
    ckpt = read_checkpoint_components(tmp_path / "vae.safetensors")
    assert list(ckpt.components) == ["vae"] and ckpt.family is None
    ref = load_model(_path(checkpoints, "sd2"), "vae")
    ours = load_model(tmp_path / "vae.safetensors")
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="a single file .* with components .*; choose one with component="):
        load_model(_path(checkpoints, "sd2"))
    with pytest.raises(CheckpointError, match="no component 'text_encoder_2'; this file has"):
        load_model(_path(checkpoints, "sd2"), "text_encoder_2")


def test_inpainting_unet_has_9_input_channels(tmp_path):
    torch.manual_seed(0)
    config = dict(UNETS["sd1"], in_channels=9)
    ref = diffusers.UNet2DConditionModel(**config)
    ref.save_pretrained(tmp_path / "unet")
    save_file(unet_to_ldm(ref.state_dict(), dict(ref.config)), tmp_path / "inpaint.safetensors")
    ours = load_model(tmp_path / "inpaint.safetensors")
    assert ours.config.in_channels == 9
    x, ctx = torch.randn(1, 9, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert_parity(ours(x, 10.0, ctx), ref(x, 10.0, ctx).sample)


def _edited(checkpoints, tmp_path, family: str, edit) -> str:
    sd = load_file(_path(checkpoints, family))
    edit(sd)
    save_file(sd, tmp_path / "edited.safetensors")
    return str(tmp_path / "edited.safetensors")


def test_unknown_keys_are_named(checkpoints, tmp_path):
    path = _edited(checkpoints, tmp_path, "sd1", lambda sd: sd.update({"lora_unet_down.alpha": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"1 key\(s\) outside the known LDM/SGM components: \['lora_unet_down"):
        read_checkpoint_components(path)
    extra = "model.diffusion_model.input_blocks.1.0.extra.weight"
    path = _edited(checkpoints, tmp_path, "sd1", lambda sd: sd.update({extra: torch.ones(1)}))
    with pytest.raises(CheckpointError, match="unexpected key.*down_blocks.0.resnets.0.extra.weight"):
        load_model(path, "unet")
    extra = "first_stage_model.decoder.mystery.weight"
    path = _edited(checkpoints, tmp_path, "sd1", lambda sd: sd.update({extra: torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"VAE key\(s\) not understood: \['decoder.mystery.weight'\]"):
        read_checkpoint_components(path)
    extra = "cond_stage_model.model.transformer.resblocks.0.attn.mystery"
    path = _edited(checkpoints, tmp_path, "sd2", lambda sd: sd.update({extra: torch.ones(1)}))
    with pytest.raises(CheckpointError, match="OpenCLIP key 'transformer.resblocks.0.attn.mystery' not understood"):
        read_checkpoint_components(path)


@pytest.mark.parametrize(
    "family, key, needle",
    [
        ("sd1", "model.diffusion_model.input_blocks.1.0.out_layers.3.weight", "UNet key 'input_blocks.1.0.out_layers"),
        ("sd1", "first_stage_model.encoder.down.1.block.0.conv1.weight", "VAE key 'encoder.down.1.block.0.conv1"),
        ("sd2", "cond_stage_model.model.ln_final.bias", r"\[cond_stage_model.model.\*\]: OpenCLIP key 'ln_final.bias'"),
    ],
)
def test_structural_key_missing(checkpoints, tmp_path, family, key, needle):
    path = _edited(checkpoints, tmp_path, family, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=needle + ".* is missing"):
        read_checkpoint_components(path)


def test_missing_key_is_named(checkpoints, tmp_path):
    path = _edited(checkpoints, tmp_path, "sdxl", lambda sd: sd.pop("model.diffusion_model.out.2.bias"))
    with pytest.raises(CheckpointError, match="needs are missing: conv_out.bias"):
        load_model(path, "unet")
    path = _edited(checkpoints, tmp_path, "sdxl", lambda sd: sd.pop("conditioner.embedders.1.model.text_projection"))
    with pytest.raises(CheckpointError, match="conditioner.embedders.1.model.text_projection is missing"):
        read_checkpoint_components(path)


def test_inconsistent_components(checkpoints, tmp_path):
    sd1, sdxl = load_file(_path(checkpoints, "sd1")), load_file(_path(checkpoints, "sdxl"))
    mixed = {k: v for k, v in sd1.items() if k.startswith("cond_stage_model.")}
    mixed.update({k: v for k, v in sdxl.items() if k.startswith("model.diffusion_model.")})
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match="the text encoders say SD1.x but the UNet does not"):
        read_checkpoint_components(tmp_path / "mixed.safetensors")
    both = dict(mixed, **{k: v for k, v in sdxl.items() if k.startswith("conditioner.")})
    save_file(both, tmp_path / "both.safetensors")
    with pytest.raises(CheckpointError, match="text encoders of different families in one file"):
        read_checkpoint_components(tmp_path / "both.safetensors")
    bad = dict(sd1)
    bad["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(32, 48)
    save_file(bad, tmp_path / "width.safetensors")
    with pytest.raises(CheckpointError, match="text encoder width 64 != UNet cross-attention width 48"):
        read_checkpoint_components(tmp_path / "width.safetensors")


def test_nonfinite_in_single_file(checkpoints, tmp_path):
    key = "model.diffusion_model.middle_block.1.proj_out.bias"
    path = _edited(checkpoints, tmp_path, "sd1", lambda sd: sd[key].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=r"\[unet\]: 1 weight tensor\(s\) hold NaN/Inf: mid_block.attentions.0"):
        load_model(path, "unet")
    load_model(path, "vae")  # the other components are fine


# --- the real configs, inferred from shapes alone (meta tensors: no memory, no data) ---------------------------------

REAL = {
    "sd1": {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
            "use_linear_projection": False, "transformer_layers_per_block": [1, 1, 1, 1]},
    "sd2": {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "upcast_attention": True,
            "transformer_layers_per_block": [1, 1, 1, 1]},
    "sdxl": {"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
             "use_linear_projection": True, "transformer_layers_per_block": [1, 2, 10],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
}  # fmt: skip
CLIP_REAL = {
    "clip-l": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "hidden_act": "quick_gelu"},
    "openclip-h": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                   "hidden_act": "gelu"},
    "openclip-bigg": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280},
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_real_configs_from_shapes(family):
    unet_kwargs = {k: v for k, v in REAL[family].items() if k != "upcast_attention"}
    if family == "sdxl":
        unet_kwargs["up_block_types"] = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    vae_kwargs = {
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_kwargs)
        vae = diffusers.AutoencoderKL(**vae_kwargs)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_REAL["clip-l"]))
        h = dict(CLIP_REAL["openclip-h"], num_hidden_layers=24)  # SD2's file has all 24 layers
        open_h = CLIPTextModelWithProjection(CLIPTextConfig(**h, projection_dim=1024))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_REAL["openclip-bigg"]))
    sd = unet_to_ldm(unet.state_dict(), dict(unet.config))
    sd.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    if family == "sd1":
        sd.update(clip_to_ldm(clip_l.state_dict(), "cond_stage_model.transformer."))
    elif family == "sd2":
        sd.update(clip_to_open_clip(open_h.state_dict(), "cond_stage_model.model."))
    else:
        sd.update(clip_to_ldm(clip_l.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(clip_to_open_clip(big_g.state_dict(), "conditioner.embedders.1.model."))
    result = split_single_file(sd, f"real-{family}")
    assert result.family == family
    unet_config = result.components["unet"].config
    for k, v in REAL[family].items():
        assert unet_config[k] == v, (k, unet_config[k], v)
    assert unet_config["layers_per_block"] == 2 and unet_config["in_channels"] == 4
    vae_config = result.components["vae"].config
    assert vae_config["block_out_channels"] == [128, 256, 512, 512] and vae_config["layers_per_block"] == 2
    assert vae_config["scaling_factor"] == (0.13025 if family == "sdxl" else 0.18215)
    encoders = {"sd1": ["clip-l"], "sd2": ["openclip-h"], "sdxl": ["clip-l", "openclip-bigg"]}[family]
    for name, preset in zip(("text_encoder", "text_encoder_2"), encoders, strict=False):  # SD1/SD2: one encoder
        config = result.components[name].config
        for k, v in CLIP_REAL[preset].items():
            assert config[k] == v, (name, k, config[k], v)
