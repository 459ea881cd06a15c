"""Test-only: random LoRAs for the tiny pipelines, written in the diffusers/PEFT layout (saved by diffusers from a
PEFT adapter) and in the kohya layout (`lora_unet_*` with SD1's diffusers names or SDXL's SGM names, `lora_te*_`),
and the reference: diffusers' load_lora_weights + fuse_lora for the UNet, PEFT's own merge for the text encoders
(transformers 5's load_adapter asks for peft >= 0.22, which is not released, so diffusers cannot load a text-encoder
LoRA here)."""

import copy
import os

import torch
from safetensors.torch import save_file

from tests.helpers.ldm_keys import unet_to_ldm

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1")


def random_pairs(model: torch.nn.Module, targets, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (down, up)} for each Linear/Conv2d whose name ends in a target (a conv's: kxk down, 1x1 up)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(tuple(targets)):
            continue
        w = m.weight
        down_shape = (rank, *w.shape[1:])
        up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        pairs[name] = (torch.randn(down_shape, generator=g) * 0.15, torch.randn(up_shape, generator=g) * 0.15)
    return pairs


def save_peft_layout(path: str, parts: dict[str, dict], rank: int, alphas: dict[str, float]) -> None:
    """`component.module.lora_A/B.weight` with the PEFT config in `lora_adapter_metadata`, as diffusers saves it."""
    import json

    tensors, meta = {}, {}
    for component, pairs in parts.items():
        for name, (down, up) in pairs.items():
            tensors[f"{component}.{name}.lora_A.weight"] = down.contiguous()
            tensors[f"{component}.{name}.lora_B.weight"] = up.contiguous()
        targets = sorted(pairs)  # exact module names: PEFT matches a target by the name's end
        meta.update({f"{component}.r": rank, f"{component}.lora_alpha": alphas[component],
                     f"{component}.target_modules": targets, f"{component}.peft_type": "LORA"})  # fmt: skip
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


def kohya_unet_name(name: str, family: str, unet_config: dict) -> str:
    """A UNet module's kohya name: diffusers' (SD1, as sd-scripts trains SD1 on diffusers' UNet) or SGM's (SDXL)."""
    if family == "sdxl":
        ldm = unet_to_ldm({f"{name}.weight": torch.zeros(1)}, unet_config)
        name = next(iter(ldm)).removeprefix("model.diffusion_model.").removesuffix(".weight")
    return "lora_unet_" + name.replace(".", "_")


def save_kohya_layout(path: str, parts: dict[str, dict], family: str, unet_config: dict, alphas: dict) -> None:
    prefixes = {
        "unet": None,
        "text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    tensors = {}
    for component, pairs in parts.items():
        for name, (down, up) in pairs.items():
            if component == "unet":
                stem = kohya_unet_name(name, family, unet_config)
            else:
                stem = prefixes[component] + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(alphas[component]))
    save_file(tensors, path)


def peft_merged_text_encoder(encoder, pairs: dict, rank: int, alpha: float, scale: float):
    """A copy of a transformers text encoder with the LoRA (pairs keyed by its module names) merged by PEFT itself:
    injected, loaded, scaled, merged."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(encoder)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(pairs)), model)
    state = {}
    for name, (down, up) in pairs.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
    set_peft_model_state_dict(model, state)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)
            module.merge()
    return model


def reference_with_lora(
    family, root, modules, sampler, unet_file: str, scale: float, text_parts: dict, rank: int, text_alpha: float
):
    """diffusers' pipeline on fresh copies of `modules`: the UNet LoRA through load_lora_weights + fuse_lora, the text
    encoders' through PEFT's merge."""
    from tests.helpers.pipeline_fixtures import diffusers_pipeline

    fresh = {name: copy.deepcopy(m) for name, m in modules.items()}
    for name, pairs in text_parts.items():
        fresh[name] = peft_merged_text_encoder(fresh[name], pairs, rank, text_alpha, scale)
    pipe = diffusers_pipeline(family, root, fresh, sampler)
    pipe.load_lora_weights(os.path.dirname(unet_file), weight_name=os.path.basename(unet_file), adapter_name="a")
    pipe.fuse_lora(components=["unet"], lora_scale=scale)
    return pipe
