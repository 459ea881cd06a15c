"""The original LDM autoencoder (`first_stage_model.*`, or a standalone VAE file) -> diffusers' AutoencoderKL keys.

Mirrors diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint: `down.i.block.j` -> `down_blocks.i.resnets.j`,
the decoder's `up.i` counted from the bottom (diffusers' `up_blocks` from the top), and the mid attention's 1x1
convs q/k/v/proj_out -> linear to_q/to_k/to_v/to_out.0. The scaling factor is not in the weights; it follows the
family (SD1/SD2 0.18215, SDXL 0.13025).
"""

import re

import torch

from diffrt.loading.errors import CheckpointError, missing_key_errors

SCALING_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _levels(sd: dict, name: str) -> list[int]:
    return sorted({int(m[1]) for k in sd if (m := re.match(rf"^{name}\.(\d+)\.", k))})


def _rename(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _new_key(parts: list[str], n: int) -> str | None:
    """The diffusers name of one LDM VAE key (split at dots), None if it is not a VAE key."""
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return ".".join(parts)
    if parts[0] not in ("encoder", "decoder"):
        return None
    side, part = parts[0], parts[1]
    if part in ("conv_in", "conv_out"):
        return ".".join(parts)
    if part == "norm_out":
        return f"{side}.conv_norm_out.{'.'.join(parts[2:])}"
    if part in ("down", "up") and parts[3] == "block":
        level = int(parts[2]) if part == "down" else n - 1 - int(parts[2])
        return f"{side}.{part}_blocks.{level}.resnets.{parts[4]}.{_rename('.'.join(parts[5:]), _RESNET)}"
    if part == "down" and parts[3] == "downsample":
        return f"{side}.down_blocks.{int(parts[2])}.downsamplers.0.{'.'.join(parts[4:])}"
    if part == "up" and parts[3] == "upsample":
        return f"{side}.up_blocks.{n - 1 - int(parts[2])}.upsamplers.0.{'.'.join(parts[4:])}"
    if part == "mid" and parts[2] in ("block_1", "block_2"):
        return f"{side}.mid_block.resnets.{int(parts[2][-1]) - 1}.{_rename('.'.join(parts[3:]), _RESNET)}"
    if part == "mid" and parts[2] == "attn_1":
        return f"{side}.mid_block.attentions.0.{_rename('.'.join(parts[3:]), _ATTN)}"
    return None


@missing_key_errors("VAE")
def convert_vae(sd: dict[str, torch.Tensor], where: str, family: str | None = None) -> tuple[dict, dict]:
    """(diffusers state_dict, diffusers config) from LDM VAE keys without the `first_stage_model.` prefix."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if key not in sd:
            raise CheckpointError(f"{where}: VAE key {key!r} is missing")
    down, up = _levels(sd, "encoder.down"), _levels(sd, "decoder.up")
    if not down or down != list(range(len(down))) or up != down:
        raise CheckpointError(f"{where}: encoder levels {down} and decoder levels {up} do not match")
    n = len(down)
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    channels = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)]

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for k, v in sd.items():
        try:
            new = _new_key(k.split("."), n)
        except (IndexError, ValueError):
            new = None
        if new is not None:
            if ".mid_block.attentions.0.to_" in new and v.ndim > 2:  # 1x1 conv -> linear
                v = v.reshape(v.shape[0], v.shape[1])
            out[new] = v
            used.add(k)
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{where}: {len(left)} VAE key(s) not understood: {left[:8]}")

    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": {"sd1": 512, "sd2": 768, "sdxl": 1024}.get(family or "sd1"),
        "scaling_factor": SCALING_FACTOR.get(family or "sd1"),
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }
    return out, config
