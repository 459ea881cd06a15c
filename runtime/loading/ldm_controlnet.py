"""The original ControlNet layout (lllyasviel's cldm.py: `control_model.*`, or the same keys without the prefix) ->
diffusers' ControlNetModel keys and config.

The encoder is the LDM UNet's (`input_blocks`, `middle_block`, `time_embed`, SDXL's `label_emb`, mapped as
diffrt.loading.ldm_unet maps them); the ControlNet's own parts are `input_hint_block` (convs at even indices, SiLU
between), `zero_convs.N.0` (one per UNet skip) and `middle_block_out.0`. The config is read off the keys and shapes;
head counts follow the families' conventions (SD1: 8 heads; SD2/SDXL: 64-wide heads), as for the UNet. The mapping
mirrors diffusers.loaders.single_file_utils.convert_controlnet_checkpoint.
"""

import re

import torch

from diffrt.loading.errors import CheckpointError, missing_key_errors
from diffrt.loading.ldm_unet import _TOP, SDXL_TIME_IDS, DownPath, _Converter, _group
from diffrt.models.unet_config import UNetConfig

PREFIX = "control_model."
MARKERS = ("input_hint_block.0.weight", "zero_convs.0.0.weight")


def is_ldm_controlnet(keys) -> bool:
    """Does this key set look like an original-layout ControlNet (with or without the `control_model.` prefix)?"""
    keys = set(keys)
    return all(m in keys or PREFIX + m in keys for m in MARKERS)


@missing_key_errors("ControlNet")
def convert_controlnet(
    sd: dict[str, torch.Tensor], where: str, like: UNetConfig | None = None
) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(diffusers state_dict, diffusers config, family) of an original-layout ControlNet. `like`: the config of the
    UNet it is for, whose head counts and SDXL time-id width are taken where the shapes agree (the weights hold
    neither; without it, the families' conventions)."""
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    down = DownPath.read(sd, _group(sd, "input_blocks"), where)
    levels, layers, channels, attn, depth = down.levels, down.layers, down.channels, down.attention, down.depth
    first = next((lv[0] for lv, a in zip(levels, attn, strict=True) if a), None)
    if first is None:
        raise CheckpointError(f"{where}: the ControlNet has no attention blocks; not an SD-family ControlNet")
    linear = sd[f"input_blocks.{first}.1.proj_in.weight"].ndim == 2
    context_dim = sd[f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    sdxl = "label_emb.0.0.weight" in sd
    family = "sdxl" if sdxl else "sd2" if linear else "sd1"
    mid_attn = any(k.startswith("middle_block.1.transformer_blocks.") for k in sd)
    hint = sorted(int(m[1]) for k in sd if (m := re.match(r"^input_hint_block\.(\d+)\.weight$", k)))
    if hint != list(range(0, 2 * len(hint), 2)) or len(hint) % 2 or len(hint) < 2:
        raise CheckpointError(f"{where}: input_hint_block convs at {hint}; expected 0, 2, ..., 2n (n even)")
    hint_channels = [sd[f"input_hint_block.{i}.weight"].shape[0] for i in hint[:-1:2]]
    config: dict = {
        "_class_name": "ControlNetModel",
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "conditioning_channels": sd["input_hint_block.0.weight"].shape[1],
        "conditioning_embedding_out_channels": hint_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attn else "UNetMidBlock2D",
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context_dim,
        "attention_head_dim": 8 if family == "sd1" else [max(1, c // 64) for c in channels],
    }
    if like is not None and list(like.block_out_channels) == channels:
        config["attention_head_dim"] = list(like.num_attention_heads)
    config |= {
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "upcast_attention": family == "sd2",
    }
    if sdxl:
        adm_in = sd["label_emb.0.0.weight"].shape[1]
        if like is not None and like.projection_class_embeddings_input_dim == adm_in:
            time_ids_dim = like.addition_time_embed_dim
        elif adm_in == 1280 + SDXL_TIME_IDS * 256:
            time_ids_dim = 256
        else:
            raise CheckpointError(f"{where}: label_emb input width {adm_in} is not SDXL's 1280 + 6 x 256")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=time_ids_dim,
                      projection_class_embeddings_input_dim=adm_in)  # fmt: skip

    c = _Converter(sd)
    for old, new in _TOP.items():
        if not old.startswith("out."):
            c.move(old, new)
    down.move(c, mid_attn)
    for i in sorted({int(m[1]) for k in sd if (m := re.match(r"^zero_convs\.(\d+)\.0\.", k))}):
        c.move(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}")
    c.move("middle_block_out.0", "controlnet_mid_block")
    c.move(f"input_hint_block.{hint[0]}", "controlnet_cond_embedding.conv_in")
    for j, i in enumerate(hint[1:-1]):
        c.move(f"input_hint_block.{i}", f"controlnet_cond_embedding.blocks.{j}")
    c.move(f"input_hint_block.{hint[-1]}", "controlnet_cond_embedding.conv_out")
    left = c.leftovers()
    if left:
        raise CheckpointError(f"{where}: {len(left)} ControlNet key(s) not understood: {left[:8]}")
    return c.out, config, family
