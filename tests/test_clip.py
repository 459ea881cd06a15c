"""diffrt.models.clip.CLIPTextModel against transformers' CLIPTextModel / CLIPTextModelWithProjection.

Each reference is built from a config, given seeded random weights (LayerNorm and bias terms perturbed too, so that
every parameter matters), saved with save_pretrained, and read back into ours through config.json and the
safetensors file, the way a diffusers text_encoder folder is loaded.
"""

from dataclasses import replace

import pytest
import torch

from diffrt.models.clip import PRESETS, CLIPTextConfig, CLIPTextModel
from diffrt.models.ops import TORCH_OPS, TRITON_OPS, set_ops
from tests.helpers.clip_models import load_ours, save_reference
from tests.helpers.parity import assert_parity

TINY = ["tiny-clip-l", "tiny-openclip-h", "tiny-openclip-bigg"]


def token_ids(config: CLIPTextConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Tokenizer-like rows: bos, words, eos, padding (eos for row 0 as SD1 pads, 0 for row 1 as SD2/SDXL pad)."""
    g = torch.Generator().manual_seed(seed)
    bos, eos = config.vocab_size - 2, config.vocab_size - 1  # CLIP's layout: the two specials have the top ids
    lengths = [11, config.max_position_embeddings - 2][:batch]
    rows = []
    for i, n in enumerate(lengths):
        words = torch.randint(0, bos, (n,), generator=g).tolist()
        row = [bos, *words, eos]
        rows.append(row + [eos if i == 0 else 0] * (config.max_position_embeddings - len(row)))
    return torch.tensor(rows)


def assert_matches(ours: CLIPTextModel, reference, ids: torch.Tensor, hidden_layers: list[int]) -> None:
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        pooled = expected.text_embeds if ours.text_projection is not None else expected.pooler_output
        for layer in hidden_layers:
            got = ours(ids, hidden_layer=layer)
            assert_parity(got.hidden_state, expected.hidden_states[layer], what=f"hidden_states[{layer}]")
        assert_parity(got.last_hidden_state, expected.last_hidden_state, what="last_hidden_state")
        assert_parity(got.pooled, pooled, what="pooled")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("preset", TINY)
def test_parity_tiny(preset, batch, tmp_path):
    config = PRESETS[preset]
    reference = save_reference(config, tmp_path)
    ours = load_ours(tmp_path)
    assert ours.config == config  # from_transformers reads back what was saved, projection included
    n = config.num_hidden_layers
    assert_matches(ours, reference, token_ids(config, batch), list(range(-(n + 1), n + 1)))


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("preset", ["tiny-clip-l", "tiny-openclip-bigg"])
def test_parity_with_fused_residuals(preset, kernels, tmp_path):
    """ops.fuse_text_residuals (each LayerNorm writes x + the closing projection's bias, the GEMM adds in place):
    the same states at every layer, the clip-skip ones kept by the caller included."""
    config = PRESETS[preset]
    reference = save_reference(config, tmp_path)
    ours = load_ours(tmp_path)
    set_ops(ours, replace(TRITON_OPS if kernels else TORCH_OPS, fuse_text_residuals=True))
    assert all(layer.ops.fuse_text_residuals for layer in ours.text_model.encoder.layers)
    n = config.num_hidden_layers
    assert_matches(ours, reference, token_ids(config, 2), list(range(-(n + 1), n + 1)))


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_l")
    reference = save_reference(PRESETS["clip-l"], folder)
    return reference, load_ours(folder)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_parity_clip_l_real_config(clip_l, batch):
    reference, ours = clip_l
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    assert_matches(ours, reference, token_ids(PRESETS["clip-l"], batch, seed=batch), [-2])


@pytest.mark.parametrize("projection_dim", [None, 24])
def test_pooling_rule_new_eos_id(projection_dim, tmp_path):
    """eos_token_id != 2 (configs after transformers PR #24773): pool at the first eos, not at the largest id."""
    eos = 500
    config = replace(PRESETS["tiny-clip-l"], eos_token_id=eos, projection_dim=projection_dim)
    reference = save_reference(config, tmp_path)
    ours = load_ours(tmp_path)
    assert ours.config.eos_token_id == eos
    ids = torch.tensor([[1000, 7, 8, eos, 1020, eos] + [eos] * 71, [1000, 9, eos] + [1023] * 74])
    # the two rules pick different positions here, so a wrong rule fails
    assert ids.argmax(-1).tolist() != (ids == eos).int().argmax(-1).tolist()
    assert_matches(ours, reference, ids, [-2])


def test_pooling_rule_legacy_eos_id_ties(tmp_path):
    """eos_token_id == 2: argmax of the ids, and the first of equal maxima (SD1 pads with the end token)."""
    config = PRESETS["tiny-clip-l"]
    reference = save_reference(config, tmp_path)
    ours = load_ours(tmp_path)
    ids = token_ids(config, 2)
    assert (ids[0] == ids[0].max()).sum() > 1
    with torch.no_grad():
        got = ours(ids).pooled
        assert_parity(got, reference(ids).pooler_output)
        assert not torch.allclose(got[0], ours(ids).last_hidden_state[0, -1])  # not simply the last position


# Published text encoder configs: SD1.x/SDXL text_encoder (CLIP-L) and SDXL text_encoder_2 as shipped in
# stabilityai/stable-diffusion-xl-base-1.0; SD2.x's text_encoder (stabilityai/stable-diffusion-2-1).
_COMMON = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "pad_token_id": 1,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}
PUBLISHED = {
    "clip-l": {**_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
               "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
    "openclip-h": {**_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
                   "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
                   "projection_dim": 512},
    "openclip-bigg": {**_COMMON, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                      "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                      "num_hidden_layers": 32, "projection_dim": 1280},
}  # fmt: skip


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_presets_equal_published_configs(preset):
    assert CLIPTextConfig.from_transformers(PUBLISHED[preset]) == PRESETS[preset]


def test_from_transformers_choices_and_errors():
    published = PUBLISHED["clip-l"]
    assert CLIPTextConfig.from_transformers(published, with_projection=True).projection_dim == 768
    # keys left out take transformers' CLIPTextConfig defaults (512 wide, 8 heads, new eos id)
    bare = CLIPTextConfig.from_transformers({"architectures": ["CLIPTextModelWithProjection"]})
    assert (bare.hidden_size, bare.num_attention_heads, bare.eos_token_id, bare.projection_dim) == (512, 8, 49407, 512)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        CLIPTextConfig.from_transformers({**published, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="hidden_size 768 is not a multiple of num_attention_heads 10"):
        CLIPTextConfig.from_transformers({**published, "num_attention_heads": 10})
    with pytest.raises(ValueError, match="full CLIPModel config"):
        CLIPTextConfig.from_transformers({"model_type": "clip", "text_config": published})
    with pytest.raises(ValueError, match="'clip_vision_model' is not a CLIP text model"):
        CLIPTextConfig.from_transformers({**published, "model_type": "clip_vision_model"})


def test_state_dict_keys_and_input_errors():
    model = CLIPTextModel(PRESETS["tiny-openclip-bigg"])
    keys = list(model.state_dict())
    assert keys[0] == "text_model.embeddings.token_embedding.weight" and keys[-1] == "text_projection.weight"
    assert "text_model.encoder.layers.3.self_attn.q_proj.bias" in keys
    assert "text_projection.weight" not in CLIPTextModel(PRESETS["tiny-clip-l"]).state_dict()
    ids = torch.zeros(1, 77, dtype=torch.int64)
    with pytest.raises(ValueError, match="hidden_layer 5 is out of range for 4 layers; use -5..4"):
        model(ids, hidden_layer=5)
    with pytest.raises(ValueError, match="78 tokens exceed the 77 positions"):
        model(torch.zeros(1, 78, dtype=torch.int64))
