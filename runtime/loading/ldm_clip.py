"""Text encoders inside single-file checkpoints -> transformers' CLIPTextModel(WithProjection) keys and config.

Two layouts occur: OpenAI CLIP-L saved through transformers (`cond_stage_model.transformer.*` in SD1,
`conditioner.embedders.0.transformer.*` in SDXL), already under transformers' names; and OpenCLIP
(`cond_stage_model.model.*` in SD2 = ViT-H, `conditioner.embedders.1.model.*` in SDXL = bigG), whose fused
`in_proj_weight` is split into q/k/v and whose `text_projection` (used as x @ P) is transposed into a Linear weight.
SD2 conditions on the penultimate layer, so its last resblock and projection are dropped (diffusers' SD2
text_encoder has 23 of the 24 layers). The config follows the keys' shapes; heads are 64 wide in all of these models,
and the activation is quick_gelu for OpenAI CLIP, gelu for OpenCLIP. The output keys carry transformers' historic
`text_model.` prefix; the loader adapts it to the module.
"""

import re

import torch

from diffrt.loading.errors import CheckpointError, missing_key_errors

# Buffers that some exporters saved and that no module has as a parameter.
IGNORED_SUFFIXES = ("position_ids", "attn_mask", "logit_scale")
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _count_layers(sd: dict, pattern: str) -> int:
    ids = {int(m[1]) for k in sd if (m := re.match(pattern, k))}
    if ids != set(range(len(ids))):
        raise CheckpointError(f"text encoder layers are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _text_config(
    *, width: int, vocab: int, positions: int, layers: int, intermediate: int, act: str, projection_dim: int | None
) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_attention_heads": max(1, width // 64),
        "num_hidden_layers": layers,
        "max_position_embeddings": positions,
        "vocab_size": vocab,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim or width,
        # the values in the published SD configs (eos_token_id 2 selects transformers' argmax pooling)
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


@missing_key_errors("CLIP")
def convert_hf_clip(sd: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    """OpenAI CLIP-L in transformers' names (prefix removed): keep the keys, infer the config."""
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    sd = {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()
    }  # (pre-4.x transformers saved the encoder without `text_model.`)
    tok = sd.get("text_model.embeddings.token_embedding.weight")
    pos = sd.get("text_model.embeddings.position_embedding.weight")
    if tok is None or pos is None:
        raise CheckpointError(f"{where}: CLIP token/position embeddings are missing")
    layers = _count_layers(sd, r"^text_model\.encoder\.layers\.(\d+)\.")
    proj = sd.get("text_projection.weight")
    config = _text_config(
        width=tok.shape[1],
        vocab=tok.shape[0],
        positions=pos.shape[0],
        layers=layers,
        intermediate=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        act="quick_gelu",
        projection_dim=None if proj is None else proj.shape[0],
    )
    return sd, config


@missing_key_errors("OpenCLIP")
def convert_open_clip(sd: dict[str, torch.Tensor], where: str, penultimate: bool) -> tuple[dict, dict]:
    """OpenCLIP text tower (prefix removed). penultimate=True (SD2): drop the last block and the projection."""
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight"):
        if key not in sd:
            raise CheckpointError(f"{where}: OpenCLIP key {key!r} is missing")
    width = sd["token_embedding.weight"].shape[1]
    n = _count_layers(sd, r"^transformer\.resblocks\.(\d+)\.")
    keep = n - 1 if penultimate else n
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    used = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    proj = sd.get("text_projection")
    if proj is not None:
        used.add("text_projection")
        if not penultimate:
            out["text_projection.weight"] = proj.T.contiguous()
    for k, v in sd.items():
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", k)
        if not m:
            continue
        used.add(k)
        i, rest = int(m[1]), m[2]
        if i >= keep:
            continue
        prefix = f"text_model.encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight / bias
            if v.shape[0] != 3 * width:
                raise CheckpointError(f"{where}: {k} has {v.shape[0]} rows, expected 3 x {width}")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split(width, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}.{kind}"] = part
            continue
        for a, b in _OPEN_CLIP_LAYER.items():
            if rest.startswith(a + "."):
                out[prefix + b + rest[len(a) :]] = v
                break
        else:
            raise CheckpointError(f"{where}: OpenCLIP key {k!r} not understood")
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{where}: {len(left)} OpenCLIP key(s) not understood: {left[:8]}")
    config = _text_config(
        width=width,
        vocab=sd["token_embedding.weight"].shape[0],
        positions=sd["positional_embedding"].shape[0],
        layers=keep,
        intermediate=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        act="gelu",
        projection_dim=None if penultimate or proj is None else proj.shape[1],
    )
    if penultimate:
        config["projection_dim"] = 512  # as in stabilityai/stable-diffusion-2*/text_encoder; unused there
    return out, config
