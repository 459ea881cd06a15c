"""LoRA files (Hu et al. 2021, https://arxiv.org/abs/2106.09685) read into one form: per component (unet,
text_encoder, text_encoder_2), per module of diffrt's models (diffusers / transformers names), the low-rank pair
(down [r, in(, kh, kw)], up [out, r(, 1, 1)]) and its alpha (scale alpha / r; alpha = r when the file has none).

Layouts, told by the keys:
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (alpha from the file's `lora_adapter_metadata`);
- diffusers' older attention-processor layout: `unet.<...>.processor.to_q_lora.down.weight`, `<module>.lora.down`,
  text encoders' `to_q_lora` (= q_proj) and `lora_linear_layer`;
- kohya / A1111 (sd-scripts, and what most trainers write): `lora_unet_<module with _ for .>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`; `lora_te_`, `lora_te1_`, `lora_te2_` for the text encoders. UNet module names are
  diffusers' (kohya's SD1/SD2 and LCM-LoRA) or the original LDM/SGM ones (`input_blocks_4_1_...`, kohya's SDXL).

kohya's underscored names are matched against the model's own module names (both spellings), as sd-scripts and A1111
do, never parsed apart. LoHa/LoKr (LyCORIS), DoRA and full-weight diffs are refused by name.
"""

import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from diffrt.loading.errors import CheckpointError
from diffrt.loading.formats import read_checkpoint
from diffrt.loading.safetensors_io import read_header

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}  # fmt: skip
UNSUPPORTED = {  # key fragment -> what it is
    "hada_w1": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid": "LoCon with a Tucker middle factor",
    ".diff": "a full-weight difference",
    ".diff_b": "a full-bias difference",
}


@dataclass(frozen=True)
class LoRALayer:
    down: torch.Tensor  # [r, in] for a Linear, [r, in, kh, kw] for a Conv2d
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float  # the update is (alpha / r) * up @ down
    key: str  # the file's key of `down`, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoRAFile:
    path: str
    layout: str  # "diffusers/PEFT", "diffusers (attention processors)", "kohya"
    layers: dict[str, dict[str, LoRALayer]]  # component -> module name as written (matched to a model later)


def read_lora(path: str | os.PathLike, allow_pickle: bool = False) -> LoRAFile:
    """The LoRA pairs of a file, by component and module name as the file spells them (not yet matched to a model);
    CheckpointError naming unsupported kinds, incomplete pairs, rank and alpha problems."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = [n for n in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors") if n in os.listdir(path)]
        if not names:
            raise CheckpointError(f"{path}: a folder without pytorch_lora_weights.safetensors; pass the LoRA file")
        path = os.path.join(path, names[0])
    sd = read_checkpoint(path, allow_pickle)
    for fragment, what in UNSUPPORTED.items():
        found = [k for k in sd if fragment in k and not (fragment == ".diff" and ".diff_b" in k)]
        if found:
            raise CheckpointError(f"{path}: holds {what} weights ({found[0]}, ...); only plain LoRA is supported")
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in sd):
        return LoRAFile(path, "kohya", _kohya_pairs(sd, path))
    if any(".lora_A." in k or ".lora_B." in k for k in sd):
        return LoRAFile(path, "diffusers/PEFT", _peft_pairs(sd, path, _metadata(path)))
    if any(k.endswith((".down.weight", ".up.weight")) and "lora" in k for k in sd):
        return LoRAFile(path, "diffusers (attention processors)", _processor_pairs(sd, path))
    raise CheckpointError(
        f"{path}: no LoRA keys found (lora_down/lora_up, lora_A/lora_B or *_lora.down/up); keys: {list(sd)[:5]}"
    )


def _metadata(path: str) -> dict:
    if not path.endswith(".safetensors"):
        return {}
    raw = read_header(path).metadata.get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _pair(sd: dict, down: str, up: str, alpha: torch.Tensor | float | None, path: str) -> LoRALayer:
    if up not in sd:
        raise CheckpointError(f"{path}: {down} has no matching {up}")
    d, u = sd[down], sd[up]
    if d.ndim not in (2, 4) or u.ndim != d.ndim:
        raise CheckpointError(f"{path}: {down} {list(d.shape)} / {up} {list(u.shape)} are neither Linear nor Conv2d")
    if u.shape[1] != d.shape[0]:
        raise CheckpointError(
            f"{path}: rank mismatch: {down} has rank {d.shape[0]} ({list(d.shape)}) but {up} has {u.shape[1]} "
            f"({list(u.shape)})"
        )
    if d.ndim == 4 and tuple(u.shape[2:]) != (1, 1):
        raise CheckpointError(f"{path}: {up} is a {tuple(u.shape[2:])} conv; a conv LoRA's up is 1x1")
    if alpha is None:
        value = float(d.shape[0])
    elif torch.is_tensor(alpha):
        if alpha.numel() != 1:
            raise CheckpointError(f"{path}: alpha of {down} has shape {list(alpha.shape)}; it must be one number")
        value = float(alpha.float().item())
    else:
        value = float(alpha)
    if not (value == value and abs(value) != float("inf")) or value <= 0:
        raise CheckpointError(f"{path}: alpha {value} of {down} must be a finite number > 0 (rank {d.shape[0]})")
    return LoRALayer(d, u, value, down)


def _collect(sd: dict, path: str, down: str, up: str, locate, alpha_of=None) -> dict[str, dict[str, LoRALayer]]:
    """Every `NAME{down}` / `NAME{up}` pair (and `NAME.alpha`) of the file: locate(NAME) -> (component, module) or
    None (not a pair of this layout); alpha_of(component, module, file alpha or None) -> the alpha to use."""
    layers: dict[str, dict[str, LoRALayer]] = {}
    used = set()
    for key in sd:
        if not key.endswith(down):
            continue
        name = key.removesuffix(down)
        found = locate(name)
        if found is None:
            continue
        component, module = found
        up_key, alpha_key = name + up, f"{name}.alpha"
        alpha = sd.get(alpha_key)
        alpha = alpha_of(component, module, alpha, sd[key].shape[0]) if alpha_of else alpha
        layers.setdefault(component, {})[module] = _pair(sd, key, up_key, alpha, path)
        used |= {key, up_key, alpha_key}
    _refuse_leftovers(sd, used, path)
    return layers


def _kohya_pairs(sd: dict, path: str) -> dict[str, dict[str, LoRALayer]]:
    def locate(name: str) -> tuple[str, str]:
        prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"{path}: {name} names no known part (lora_unet_, lora_te_, lora_te1_, lora_te2_)")
        return KOHYA_PREFIXES[prefix], name[len(prefix) :]

    return _collect(sd, path, ".lora_down.weight", ".lora_up.weight", locate)


def _split_component(name: str) -> tuple[str, str]:
    for component in COMPONENTS:
        if name.startswith(component + "."):
            return component, name[len(component) + 1 :]
    return "unet", name  # diffusers' oldest files hold the UNet's layers without a prefix


def _peft_pairs(sd: dict, path: str, metadata: dict) -> dict[str, dict[str, LoRALayer]]:
    if any(k.endswith(".use_dora") and v for k, v in metadata.items()):
        raise CheckpointError(f"{path}: a DoRA adapter (use_dora in its metadata); only plain LoRA is supported")

    def alpha_of(component: str, module: str, alpha, rank: int):
        alpha = alpha if alpha is not None else _metadata_alpha(metadata, component, module)
        if alpha is not None and metadata.get(f"{component}.use_rslora"):  # rsLoRA scales by alpha / sqrt(r)
            alpha = float(alpha) * rank**0.5
        return alpha

    return _collect(sd, path, ".lora_A.weight", ".lora_B.weight", _split_component, alpha_of)


def _metadata_alpha(metadata: dict, component: str, module: str) -> float | None:
    """PEFT's LoraConfig as diffusers saves it: lora_alpha, with alpha_pattern overriding it per module."""
    for pattern, alpha in (metadata.get(f"{component}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return alpha
    return metadata.get(f"{component}.lora_alpha")


_PROCESSOR_NAMES = {  # diffusers' attention-processor LoRA names -> the module they adapt
    ".processor.to_q_lora": ".to_q",
    ".processor.to_k_lora": ".to_k",
    ".processor.to_v_lora": ".to_v",
    ".processor.to_out_lora": ".to_out.0",
    ".to_q_lora": ".q_proj",  # text encoders: self_attn.to_q_lora is q_proj
    ".to_k_lora": ".k_proj",
    ".to_v_lora": ".v_proj",
    ".to_out_lora": ".out_proj",
    ".lora_linear_layer": "",
    ".lora": "",
    "_lora": "",
}


def _processor_pairs(sd: dict, path: str) -> dict[str, dict[str, LoRALayer]]:
    def locate(name: str) -> tuple[str, str] | None:
        module = next((name[: -len(a)] + b for a, b in _PROCESSOR_NAMES.items() if name.endswith(a)), None)
        return None if module is None else _split_component(module)

    return _collect(sd, path, ".down.weight", ".up.weight", locate)


def _refuse_leftovers(sd: dict, used: set, path: str) -> None:
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{path}: {len(left)} key(s) that are not part of a LoRA pair: {left[:6]}")


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers of a model, by their diffusers / transformers names."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def ldm_unet_names(config) -> dict[str, str]:
    """{LDM/SGM module prefix: diffusers module prefix} of a UNetConfig's blocks (openaimodel.py's numbering: input
    block 0 is conv_in, each level's res blocks then its downsample; output blocks per level, upsample last)."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
    names = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
             "label_emb.0.2": "add_embedding.linear_2", "out.2": "conv_out"}  # fmt: skip

    def block(ldm: str, ours: str, kind: str) -> None:
        if kind == "resnet":
            names.update({f"{ldm}.{b}": f"{ours}.{a}" for a, b in resnet.items()})
        else:
            names[ldm] = ours

    index, n = 1, len(config.block_out_channels)
    for level in range(n):
        for j in range(config.layers_per_block[level]):
            block(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resnet")
            block(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", "attention")
            index += 1
        if level < n - 1:
            block(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "conv")
            index += 1
    block("middle_block.0", "mid_block.resnets.0", "resnet")
    block("middle_block.1", "mid_block.attentions.0", "attention")
    block("middle_block.2", "mid_block.resnets.1", "resnet")
    index = 0
    for u in range(n):
        layers = config.layers_per_block[n - 1 - u] + 1
        for j in range(layers):
            block(f"output_blocks.{index}.0", f"up_blocks.{u}.resnets.{j}", "resnet")
            block(f"output_blocks.{index}.1", f"up_blocks.{u}.attentions.{j}", "attention")
            if j == layers - 1 and u < n - 1:
                attn = config.up_block_types[u].startswith("CrossAttn")
                block(f"output_blocks.{index}.{2 if attn else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv", "conv")
            index += 1
    return names
