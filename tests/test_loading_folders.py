"""diffusers / transformers folders into our modules: component and pipeline folders, fp16 variants, sharded
indexes, pickled .bin weights, and the errors for missing / unexpected / misshapen / non-finite weights."""

import json
import os
import shutil
import warnings

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffrt.loading import CheckpointError, load_model, read_checkpoint_components
from diffrt.models.clip import CLIPTextModel
from diffrt.models.taesd import AutoencoderTiny
from diffrt.models.vae import AutoencoderKL
from tests.helpers.loading_fixtures import CLIP_L, VAE
from tests.helpers.parity import assert_parity

VAE_FILE = "diffusion_pytorch_model.safetensors"


def _vae(folder, **save_kwargs) -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE).eval()
    ref.save_pretrained(folder, **save_kwargs)
    return ref


@pytest.fixture
def vae_dir(tmp_path):
    folder = str(tmp_path / "vae")
    return folder, _vae(folder)


def _image(batch=2):
    return torch.randn(batch, 3, 16, 24, generator=torch.Generator().manual_seed(1))


def test_component_folder_vae(vae_dir):
    folder, ref = vae_dir
    ours = load_model(folder)
    assert isinstance(ours, AutoencoderKL) and not ours.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        assert_parity(ours(_image()), ref(_image()).sample)


def test_dtype_argument(vae_dir):
    folder, ref = vae_dir
    ours = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    w = "decoder.conv_out.weight"
    assert torch.equal(ours.state_dict()[w], ref.state_dict()[w].bfloat16())


def test_taesd_folder(tmp_path):
    from tests.test_taesd import TINY_CONFIG

    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(**{k: v for k, v in TINY_CONFIG.items() if not k.startswith("_")}).eval()
    ref.save_pretrained(tmp_path / "taesd")
    ours = load_model(tmp_path / "taesd")
    assert isinstance(ours, AutoencoderTiny)
    x = _image()
    with torch.no_grad():
        assert_parity(ours.decode(ours.encode(x)), ref.decode(ref.encode(x).latents).sample)


@pytest.mark.parametrize("cls_name", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_text_encoder_folder_both_key_layouts(tmp_path, cls_name):
    """transformers 5 saves CLIPTextModel without `text_model.`; older files (and WithProjection) have it."""
    import transformers

    torch.manual_seed(0)
    ref = getattr(transformers, cls_name)(CLIPTextConfig(**CLIP_L, projection_dim=16)).eval()
    ref.save_pretrained(tmp_path / "te")
    ids = torch.tensor([[0, 5, 17, 400, 2, 1, 1], [0, 9, 9, 2, 1, 1, 1]])
    with torch.no_grad():
        r = ref(ids)
    ours = load_model(tmp_path / "te")
    assert isinstance(ours, CLIPTextModel) and (ours.text_projection is not None) == ("Projection" in cls_name)
    with torch.no_grad():
        out = ours(ids)
    assert_parity(out.last_hidden_state, r.last_hidden_state)
    if "Projection" in cls_name:
        assert_parity(out.pooled, r.text_embeds)
    # the other layout of the same weights loads too
    path = tmp_path / "te" / "model.safetensors"
    sd = load_file(path)
    flip = {
        (k.removeprefix("text_model.") if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
    }
    flip = {("text_projection.weight" if k.endswith("text_projection.weight") else k): v for k, v in flip.items()}
    save_file(flip, path)
    assert_parity(load_model(tmp_path / "te")(ids).last_hidden_state, r.last_hidden_state)


def test_fp16_variant(tmp_path):
    folder = str(tmp_path / "vae")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAE).eval().half()
    ref.save_pretrained(folder, variant="fp16")
    assert os.listdir(folder) and "diffusion_pytorch_model.fp16.safetensors" in os.listdir(folder)
    with pytest.raises(CheckpointError, match=r"did you mean the fp16 variant\? Pass variant='fp16'"):
        load_model(folder)
    ours = load_model(folder, variant="fp16")  # fp16 file, float32 model (the default dtype)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v.float()), k
    with pytest.raises(CheckpointError, match=r"no weights for variant='bf16'; available: 'fp16'"):
        load_model(folder, variant="bf16")
    ref.float().save_pretrained(folder)  # now both: default and fp16
    with pytest.raises(CheckpointError, match=r"available: 'fp16', None \(the default\)"):
        load_model(folder, variant="ema")


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_index(tmp_path, variant):
    folder = str(tmp_path / "vae")
    ref = _vae(folder, max_shard_size="300KB", variant=variant)
    index = "diffusion_pytorch_model.safetensors.index" + (f".{variant}" if variant else "") + ".json"
    assert index in os.listdir(folder) and len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    ours = load_model(folder, variant=variant)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_sharded_transformers_folder(tmp_path):
    torch.manual_seed(0)
    ref = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, projection_dim=16)).eval()
    ref.save_pretrained(tmp_path / "te", max_shard_size="100KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "te")
    ids = torch.tensor([[0, 5, 17, 2]])
    with torch.no_grad():
        assert_parity(load_model(tmp_path / "te")(ids).pooled, ref(ids).text_embeds)


def test_bad_shard_indexes(tmp_path):
    folder = tmp_path / "vae"
    _vae(str(folder), max_shard_size="300KB")
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])

    def with_map(weight_map):
        index_path.write_text(json.dumps({**index, "weight_map": weight_map}))

    with_map({**index["weight_map"], key: "../../etc/passwd"})
    with pytest.raises(CheckpointError, match=r"shard name '\.\./\.\./etc/passwd' must be a plain file name"):
        load_model(folder)
    with_map({**index["weight_map"], key: "missing.safetensors"})
    with pytest.raises(CheckpointError, match=r"shard 'missing.safetensors' .* does not exist"):
        load_model(folder)
    with_map({**index["weight_map"], "encoder.extra.weight": shards[0]})
    with pytest.raises(CheckpointError, match=r"the index maps \['encoder.extra.weight'\] to this shard but it lacks"):
        load_model(folder)
    with_map({k: v for k, v in index["weight_map"].items() if k != key})
    with pytest.raises(CheckpointError, match=f"holds key '{key}' but the index does not list it"):
        load_model(folder)


def test_missing_key(vae_dir):
    folder, _ = vae_dir
    path = os.path.join(folder, VAE_FILE)
    sd = load_file(path)
    del sd["decoder.conv_out.bias"]
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) the AutoencoderKL needs are missing: decoder.conv_out.bias"):
        load_model(folder)


def test_unexpected_key(vae_dir):
    folder, _ = vae_dir
    path = os.path.join(folder, VAE_FILE)
    sd = load_file(path)
    sd["decoder.extra_head.weight"] = torch.zeros(3)
    save_file(sd, path)
    with pytest.raises(
        CheckpointError, match=r"unexpected key\(s\) the AutoencoderKL does not have: decoder.extra_head"
    ):
        load_model(folder)


def test_ldm_keys_in_a_diffusers_folder(vae_dir):
    folder, _ = vae_dir
    path = os.path.join(folder, VAE_FILE)
    save_file({"first_stage_model." + k: v for k, v in load_file(path).items()}, path)
    with pytest.raises(CheckpointError, match="original LDM names: pass the single file itself"):
        load_model(folder)


def test_shape_mismatch(vae_dir):
    folder, _ = vae_dir
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["latent_channels"] = 8
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(
        CheckpointError, match=r"7 shape mismatch.*post_quant_conv.weight: file \[4, 4, 1, 1\] vs model \[8, 8, 1, 1\]"
    ):
        load_model(folder)


def test_nonfinite_weights(vae_dir):
    folder, _ = vae_dir
    path = os.path.join(folder, VAE_FILE)
    sd = load_file(path)
    sd["encoder.conv_in.bias"][3] = float("nan")
    sd["decoder.conv_out.weight"][0, 0, 0, :2] = float("inf")
    save_file(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "encoder.conv_in.bias (1 NaN, 0 Inf)" in msg and "decoder.conv_out.weight (0 NaN, 2 Inf)" in msg
    assert "check_finite='warn'" in msg
    with pytest.warns(UserWarning, match="encoder.conv_in.bias"):
        load_model(folder, check_finite="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(folder, check_finite="off")


def test_overflow_to_fp16_is_reported(vae_dir):
    folder, _ = vae_dir
    path = os.path.join(folder, VAE_FILE)
    sd = load_file(path)
    sd["encoder.conv_in.bias"][0] = 1e6  # finite in float32, Inf in float16
    save_file(sd, path)
    load_model(folder)
    with pytest.raises(CheckpointError, match=r"encoder.conv_in.bias \(0 NaN, 1 Inf\)"):
        load_model(folder, dtype=torch.float16)


def test_pickle_bin_folder(vae_dir):
    folder, ref = vae_dir
    sd = load_file(os.path.join(folder, VAE_FILE))
    os.remove(os.path.join(folder, VAE_FILE))
    torch.save(sd, os.path.join(folder, "diffusion_pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="only pickle weights .* allow_pickle=True"):
        load_model(folder)
    ours = load_model(folder, allow_pickle=True)
    with torch.no_grad():
        assert_parity(ours(_image()), ref(_image()).sample)


def test_deprecated_vae_attention_names(vae_dir):
    folder, ref = vae_dir
    path = os.path.join(folder, VAE_FILE)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in load_file(path).items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        sd[k] = v
    assert any(".query." in k for k in sd)
    save_file(sd, path)
    with torch.no_grad():
        assert_parity(load_model(folder)(_image()), ref(_image()).sample)


def test_pipeline_folder_components(tmp_path):
    root = tmp_path / "pipe"
    _vae(str(root / "vae"))
    torch.manual_seed(0)
    CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, projection_dim=16)).save_pretrained(root / "text_encoder")
    os.makedirs(root / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="components vae, text_encoder; choose one with component="):
        load_model(root)
    assert isinstance(load_model(root, "vae"), AutoencoderKL)
    assert isinstance(load_model(root, "text_encoder"), CLIPTextModel)
    with pytest.raises(CheckpointError, match="no component 'unet'; this pipeline has vae, text_encoder"):
        load_model(root, "unet")
    ckpt = read_checkpoint_components(root)
    assert ckpt.kind == "pipeline folder" and set(ckpt.components) == {"vae", "text_encoder"}
    assert ckpt.folders == {"tokenizer": str(root / "tokenizer")}
    assert ckpt.skipped == {"feature_extractor": "CLIPImageProcessor"}
    # a transformers config without `architectures`: model_index.json's class decides (here: with projection)
    config = json.loads((root / "text_encoder" / "config.json").read_text())
    del config["architectures"]
    (root / "text_encoder" / "config.json").write_text(json.dumps(config))
    assert load_model(root, "text_encoder").text_projection is not None
    shutil.rmtree(root / "vae")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(root, "vae")


def test_weight_file_beside_its_config(vae_dir):
    folder, ref = vae_dir
    ours = load_model(os.path.join(folder, VAE_FILE))
    with torch.no_grad():
        assert_parity(ours(_image()), ref(_image()).sample)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="without model_index.json .* or config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter"}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / VAE_FILE))
    with pytest.raises(CheckpointError, match="model class 'T2IAdapter' is not supported; supported: UNet2D"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "nope")


def test_loaded_module_does_not_depend_on_the_file(vae_dir):
    """Weights already in the file's dtype are copied off the memory map: rewriting the file changes nothing."""
    folder, ref = vae_dir
    ours = load_model(folder)
    path = os.path.join(folder, VAE_FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # zero the data in place, keeping the header
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(b"\0" * (size - header))
    with torch.no_grad():
        assert_parity(ours(_image()), ref(_image()).sample)
