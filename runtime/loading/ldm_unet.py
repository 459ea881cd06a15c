"""The original LDM/SGM UNet (`model.diffusion_model.*`, openaimodel.py) -> diffusers' UNet2DConditionModel keys.

The config is read off the keys and shapes: levels from the downsample blocks, channels from the convs, attention
per level and transformer depth from the SpatialTransformer keys, linear vs conv projections from proj_in's rank,
SDXL's added conditioning from `label_emb`. Head counts are not in the weights; they follow the families'
conventions (SD1: 8 heads everywhere; SD2/SDXL: 64-wide heads). The mapping mirrors
diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint, written from the structure instead of from a YAML.
"""

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from diffrt.loading.errors import CheckpointError, missing_key_errors

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
SDXL_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2), each embedded to addition_time_embed_dim


def _group(sd: dict, name: str) -> dict[int, dict[int, list[str]]]:
    """{block i: {layer j: [rest of key]}} for keys `name.i.j.rest`."""
    out: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    pat = re.compile(rf"^{name}\.(\d+)\.(\d+)\.(.+)$")
    for k in sd:
        m = pat.match(k)
        if m:
            out[int(m[1])][int(m[2])].append(m[3])
    return out


def _depth(rests: list[str]) -> int:
    return len({r.split(".")[1] for r in rests if r.startswith("transformer_blocks.")})


class _Converter:
    """Moves LDM keys to diffusers keys, remembering which were used so that leftovers can be reported."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd, self.out, self.used = sd, {}, set()

    def move(self, old_prefix: str, new_prefix: str, rename: dict[str, str] | None = None) -> None:
        for k in [k for k in self.sd if k.startswith(old_prefix + ".")]:
            rest = k[len(old_prefix) + 1 :]
            for a, b in (rename or {}).items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
            self.out[f"{new_prefix}.{rest}"] = self.sd[k]
            self.used.add(k)

    def leftovers(self) -> list[str]:
        return sorted(set(self.sd) - self.used)


@dataclass(frozen=True)
class DownPath:
    """The encoder half of an LDM UNet (a ControlNet has only this half): each res block of `input_blocks` adds to
    the current level, a downsample (`.0.op`) closes it."""

    levels: list[list[int]]  # input block ids of each level's res blocks
    downsamples: list[int]  # input block id of each level's downsample (all levels but the last)
    layers: int  # res blocks per level
    channels: list[int]
    attention: list[bool]  # per level
    depth: list[int]  # transformer blocks per level (1 where there is no attention)

    @classmethod
    def read(cls, sd: dict, inp: dict, where: str) -> "DownPath":
        levels: list[list[int]] = [[]]
        downsamples: list[int] = []
        for i in sorted(k for k in inp if k > 0):
            if any(r.startswith("op.") for r in inp[i][0]):
                downsamples.append(i)
                levels.append([])
            else:
                levels[-1].append(i)
        counts = {len(lv) for lv in levels}
        if len(counts) != 1 or 0 in counts:
            raise CheckpointError(f"{where}: UNet levels have unequal res block counts {[len(lv) for lv in levels]}")
        channels = [sd[f"input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0] for lv in levels]
        attention = [bool(inp[lv[0]].get(1)) for lv in levels]
        depth = [_depth(inp[lv[0]][1]) if a else 1 for lv, a in zip(levels, attention, strict=True)]
        return cls(levels, downsamples, counts.pop(), channels, attention, depth)

    def move(self, c: "_Converter", mid_attention: bool) -> None:
        """The down blocks' and the middle block's keys to diffusers' names."""
        for level, ids in enumerate(self.levels):
            for j, i in enumerate(ids):
                c.move(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", _RESNET)
                c.move(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}")
            if level < len(self.downsamples):
                c.move(f"input_blocks.{self.downsamples[level]}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
        c.move("middle_block.0", "mid_block.resnets.0", _RESNET)
        if mid_attention:
            c.move("middle_block.1", "mid_block.attentions.0")
            c.move("middle_block.2", "mid_block.resnets.1", _RESNET)


@missing_key_errors("UNet")
def convert_unet(
    sd: dict[str, torch.Tensor], where: str, family: str | None = None, pooled_dim: int | None = None
) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(diffusers state_dict, diffusers config, family) from LDM UNet keys without the `model.diffusion_model.`
    prefix. `family` ("sd1"/"sd2"/"sdxl") is inferred from the structure when None; `pooled_dim` (the second text
    encoder's projection width) pins SDXL's addition_time_embed_dim."""
    try:
        return _convert_unet(sd, where, family, pooled_dim)
    except StopIteration as e:
        raise CheckpointError(f"{where}: the UNet has no attention blocks; not an SD-family UNet") from e


def _convert_unet(sd: dict, where: str, family: str | None, pooled_dim: int | None) -> tuple[dict, dict, str]:
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise CheckpointError(f"{where}: UNet keys input_blocks.0.0.weight / out.2.weight are missing")
    inp, outp = _group(sd, "input_blocks"), _group(sd, "output_blocks")
    mid: dict[int, list[str]] = defaultdict(list)  # middle_block.i.rest: one sequence, no per-layer level
    for k in sd:
        if m := re.match(r"^middle_block\.(\d+)\.(.+)$", k):
            mid[int(m[1])].append(m[2])

    down = DownPath.read(sd, inp, where)
    levels, layers, channels = down.levels, down.layers, down.channels
    down_attn, down_depth = down.attention, down.depth
    n_levels = len(levels)
    if sorted(outp) != list(range(n_levels * (layers + 1))):
        raise CheckpointError(
            f"{where}: {len(outp)} output blocks, expected {n_levels * (layers + 1)} for {n_levels} levels of "
            f"{layers} res blocks"
        )
    first_up = [outp[u * (layers + 1)].get(1, []) for u in range(n_levels)]
    up_attn = [any(r.startswith("transformer_blocks.") for r in rests) for rests in first_up]
    up_depth = [_depth(outp[u * (layers + 1)][1]) if a else 1 for u, a in enumerate(up_attn)]
    if sorted(mid) != [0, 1, 2] or not any(r.startswith("transformer_blocks.") for r in mid[1]):
        raise CheckpointError(f"{where}: only a middle block of resnet-transformer-resnet is supported")
    mid_depth = _depth(mid[1])

    proj_in = next(sd[f"input_blocks.{lv[0]}.1.proj_in.weight"] for lv, a in zip(levels, down_attn, strict=True) if a)
    linear = proj_in.ndim == 2
    context_dim = next(
        sd[f"input_blocks.{lv[0]}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        for lv, a in zip(levels, down_attn, strict=True)
        if a
    )
    sdxl = "label_emb.0.0.weight" in sd
    if family is None:
        family = "sdxl" if sdxl else "sd2" if linear else "sd1"
    if family == "sd1":
        heads: int | list[int] = 8
    else:  # SD2/SDXL: 64-channel heads (diffusers calls the head *count* attention_head_dim)
        heads = [max(1, c // 64) for c in channels]

    config: dict = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "out_channels": sd["out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": down_depth,
        "upcast_attention": family == "sd2",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    if up_depth != down_depth[::-1]:
        config["reverse_transformer_layers_per_block"] = up_depth
    if mid_depth != down_depth[-1]:
        raise CheckpointError(f"{where}: middle block depth {mid_depth} != last level's {down_depth[-1]}")
    time_dim = sd["time_embed.0.weight"].shape[0]
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    if sdxl:
        adm_in = sd["label_emb.0.0.weight"].shape[1]
        if pooled_dim is not None:
            time_ids_dim, rem = divmod(adm_in - pooled_dim, SDXL_TIME_IDS)
        else:  # no text encoder to ask: SDXL base's 256 if it fits
            time_ids_dim, rem = 256, adm_in - 1280 - 6 * 256
        if rem or time_ids_dim <= 0:
            raise CheckpointError(
                f"{where}: label_emb input width {adm_in} is not pooled text ({pooled_dim or 1280}) + "
                f"{SDXL_TIME_IDS} time ids; this looks like an unsupported variant (e.g. the SDXL refiner)"
            )
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_ids_dim,
            projection_class_embeddings_input_dim=adm_in,
        )
    elif any(k.startswith("label_emb.") for k in sd):
        raise CheckpointError(f"{where}: class-conditioned UNets (label_emb without SDXL's layout) are not supported")

    c = _Converter(sd)
    for old, new in _TOP.items():
        c.move(old, new)
    down.move(c, mid_attention=True)
    for u in range(n_levels):
        for j in range(layers + 1):
            i = u * (layers + 1) + j
            c.move(f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", _RESNET)
            up = 2 if up_attn[u] else 1
            if up_attn[u]:
                c.move(f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}")
            c.move(f"output_blocks.{i}.{up}.conv", f"up_blocks.{u}.upsamplers.0.conv")
    left = c.leftovers()
    if left:
        raise CheckpointError(f"{where}: {len(left)} UNet key(s) not understood: {left[:8]}")
    return c.out, config, family
