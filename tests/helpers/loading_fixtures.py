"""Test-only: small random-weight SD1 / SD2 (v-prediction) / SDXL pipelines saved by diffusers and transformers, and
the same weights written as one LDM/SGM single file through tests/ldm_keys.py.

The tiny configs keep each family's structure (SD1: 1x1-conv projections, 8 heads; SD2: linear projections, 64-wide
heads, upcast attention; SDXL: three levels with the first attention-free, transformer depth per level, text_time
conditioning, two text encoders with the second projected) at sizes that run in milliseconds on a CPU.
Channel counts are multiples of 32 (the families' GroupNorm) and head widths 64 where the family fixes them.
"""

import json
import os

import torch
from safetensors.torch import save_file

from tests.helpers.ldm_keys import clip_to_ldm, clip_to_open_clip, unet_to_ldm, vae_to_ldm

CLIP_L = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 1,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
OPEN_CLIP = dict(CLIP_L, hidden_act="gelu")
UNETS = {
    "sd1": {
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 2,
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "sample_size": 16,
    },
    "sd2": {
        "block_out_channels": (64, 128),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": (1, 2),
        "use_linear_projection": True,
        "upcast_attention": True,
        "norm_num_groups": 32,
        "sample_size": 16,
    },
    "sdxl": {
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 1, 2),
        "cross_attention_dim": 64 + 128,
        "attention_head_dim": (1, 1, 2),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "norm_num_groups": 32,
        "sample_size": 16,
    },
}
VAE = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def _save(model, folder: str) -> dict:
    model.save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def make_pipeline(family: str, root: str, seed: int = 0) -> dict:
    """Save a tiny random pipeline of `family` under root/; return {component: (reference module, config dict)}."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    models = {"unet": UNet2DConditionModel(**UNETS[family])}
    models["vae"] = AutoencoderKL(**VAE, scaling_factor=0.13025 if family == "sdxl" else 0.18215)
    if family == "sd1":
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    elif family == "sd2":
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**OPEN_CLIP))
    else:
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        big = dict(OPEN_CLIP, hidden_size=128, intermediate_size=256, num_attention_heads=2, projection_dim=32)
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**big))
    out = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():  # random LayerNorm/GroupNorm affine params so that a swapped norm would show
            for p_name, p in model.named_parameters():
                if "norm" in p_name:
                    p.normal_(1.0 if p_name.endswith("weight") else 0.0, 0.1)
        out[name] = (model, _save(model, os.path.join(root, name)))
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    )
    scheduler.save_pretrained(os.path.join(root, "scheduler"))
    index = {
        "_class_name": PIPELINES[family],
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    for name, (model, _) in out.items():
        index[name] = ["diffusers" if name in ("unet", "vae") else "transformers", type(model).__name__]
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return out


def write_single_file(family: str, ref: dict, path: str, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """The reference pipeline's weights as one LDM (SD1/SD2) or SGM (SDXL) safetensors file."""
    sd = {}
    unet, unet_cfg = ref["unet"]
    sd.update(unet_to_ldm(unet.state_dict(), unet_cfg))
    vae, vae_cfg = ref["vae"]
    sd.update(vae_to_ldm(vae.state_dict(), vae_cfg))
    te = ref["text_encoder"][0].state_dict()
    if family == "sd1":
        sd.update(clip_to_ldm(te, "cond_stage_model.transformer."))
    elif family == "sd2":
        sd.update(clip_to_open_clip(te, "cond_stage_model.model.", extra_layer=True))
    else:
        sd.update(clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        sd.update(clip_to_open_clip(ref["text_encoder_2"][0].state_dict(), "conditioner.embedders.1.model."))
    # training leftovers that real files carry and loaders must skip
    sd["alphas_cumprod"] = torch.linspace(0.999, 0.01, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd.update(extra or {})
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return sd
