"""Test-only: diffusers/transformers state dicts -> original LDM/SGM single-file key names (the REVERSE mapping).

Written from the LDM layout (openaimodel.py, autoencoder's Encoder/Decoder, OpenCLIP's TextTransformer) and
independently of diffrt.loading's forward conversion, so that a round trip through both checks each against the
other rather than against itself.
"""

import re

import torch

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel keys -> `model.diffusion_model.*` keys (input_blocks / middle_block / output_blocks)."""
    per_level = config["layers_per_block"] + 1  # LDM: n res blocks + one downsample per level (input side)
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    top = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for key, value in sd.items():
        new = None
        for a, b in top.items():
            if key.startswith(a + "."):
                new = b + key[len(a) :]
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            idx = 1 + int(m[1]) * per_level + int(m[2])
            new = f"input_blocks.{idx}.0.{_RESNET_TO_LDM[m[3]]}.{m[4]}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_RESNET_TO_LDM[m[2]]}.{m[3]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_RESNET_TO_LDM[m[3]]}.{m[4]}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            u = int(m[1])  # the upsample closes the level's last output block, after its attention if any
            new = f"output_blocks.{u * per_level + per_level - 1}.{2 if up_attn[u] else 1}.conv.{m[2]}"
        assert new is not None, f"no LDM name for UNet key {key}"
        out["model.diffusion_model." + new] = value
    return out


def controlnet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """ControlNetModel keys -> the original cldm.py keys (without `control_model.`): the encoder as the UNet's,
    `zero_convs.N.0`, `middle_block_out.0` and `input_hint_block.{0, 2, ...}` (SiLUs at the odd indices)."""
    encoder = {k: v for k, v in sd.items() if not k.startswith("controlnet_")}
    out = {
        k.removeprefix("model.diffusion_model."): v
        for k, v in unet_to_ldm(encoder, {**config, "up_block_types": []}).items()
    }
    hint = [k for k in sd if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")]
    for key, value in sd.items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(\w+)", key):
            out[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif m := re.match(r"controlnet_mid_block\.(\w+)", key):
            out[f"middle_block_out.0.{m[1]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.conv_in\.(\w+)", key):
            out[f"input_hint_block.0.{m[1]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)", key):
            out[f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.conv_out\.(\w+)", key):
            out[f"input_hint_block.{2 * (len(hint) + 1)}.{m[1]}"] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys -> `first_stage_model.*` (decoder levels counted from the bottom, attention as 1x1 conv)."""
    n = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", new):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", new):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(\w+)\.mid_block\.resnets\.(\d)\.(.+)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(\w+)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", new):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's AttnBlock uses 1x1 convs
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> `prefix` + transformers' historic names (text_model.*), plus the
    position_ids buffer that SD1-era exports carry."""
    out = {}
    for key, value in sd.items():
        name = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        out[prefix + name] = value
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(
        sd[next(k for k in sd if k.endswith("position_embedding.weight"))].shape[0]
    )[None]
    return out


def clip_to_open_clip(sd: dict[str, torch.Tensor], prefix: str, extra_layer: bool = False) -> dict[str, torch.Tensor]:
    """transformers CLIP text keys -> OpenCLIP's TextTransformer (`prefix` + token_embedding, transformer.resblocks.i,
    fused in_proj, text_projection as a [width, proj] matrix). extra_layer adds the final resblock and projection
    that SD2's checkpoints carry but do not use (random values)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    layer_names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    for i in range(n):
        src = f"encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for a, b in layer_names.items():
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    width = sd["embeddings.token_embedding.weight"].shape[1]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    if extra_layer:
        g = torch.Generator().manual_seed(1)
        for k in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.0.")]:
            out[k.replace(".resblocks.0.", f".resblocks.{n}.")] = torch.randn(out[k].shape, generator=g)
        out[prefix + "text_projection"] = torch.randn(width, width // 2, generator=g)
    return out
