"""From (class name, config dict, state_dict) to one of our modules, with every key and shape checked first.

The module is built on the meta device (no allocation, no random init) and then takes the file's tensors by
assignment (`load_state_dict(assign=True)`): each weight is read once, straight into its final dtype and device. A
tensor that would still view the file's memory map afterwards (same dtype, on CPU) is copied, so that the module
never depends on the file staying unchanged on disk (a rewritten or truncated file under a live map means changed
weights or SIGBUS).
"""

import importlib
from collections.abc import Mapping

import torch
from torch import nn

from diffrt.loading.errors import CheckpointError
from diffrt.loading.finite import check_finite as _check_finite

# class name in a diffusers/transformers config -> (module, class, config class, config constructor)
MODELS: dict[str, tuple[str, str, str, str]] = {
    "UNet2DConditionModel": ("diffrt.models.unet", "UNet2DConditionModel", "UNetConfig", "from_diffusers"),
    "AutoencoderKL": ("diffrt.models.vae", "AutoencoderKL", "AutoencoderKLConfig", "from_diffusers"),
    "AutoencoderTiny": ("diffrt.models.taesd", "AutoencoderTiny", "TAESDConfig", "from_diffusers"),
    "CLIPTextModel": ("diffrt.models.clip", "CLIPTextModel", "CLIPTextConfig", "from_transformers"),
    "CLIPTextModelWithProjection": ("diffrt.models.clip", "CLIPTextModel", "CLIPTextConfig", "from_transformers"),
    "ControlNetModel": ("diffrt.models.controlnet", "ControlNetModel", "ControlNetConfig", "from_diffusers"),
}
# Keys that old exporters saved as state and no module of ours holds (transformers' CLIP position_ids buffer).
IGNORABLE_SUFFIXES = (".position_ids",)


def model_classes(class_name: str, source: str) -> tuple[type, type, str]:
    if class_name not in MODELS:
        raise CheckpointError(f"{source}: model class {class_name!r} is not supported; supported: {', '.join(MODELS)}")
    module, cls, config_cls, ctor = MODELS[class_name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, config_cls), ctor


def make_config(class_name: str, config: dict, source: str):
    _, config_cls, ctor = model_classes(class_name, source)
    if ctor == "from_transformers":  # the class decides the projection, whatever `architectures` says (or lacks)
        config = {**config, "architectures": [class_name]}
    try:
        return getattr(config_cls, ctor)(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot build a {class_name} config from it: {e}") from e


def _adapt_prefix(state_dict: dict, expected: set[str]) -> dict:
    """transformers' CLIPTextModel dropped its `text_model.` level in 5.x; files exist with and without it."""
    add = "text_model."
    has = any(k.startswith(add) for k in state_dict)
    wants = any(k.startswith(add) for k in expected)
    if has and not wants:
        return {k.removeprefix(add): v for k, v in state_dict.items()}
    if wants and not has:
        return {(add + k if add + k in expected else k): v for k, v in state_dict.items()}
    return state_dict


def _name_list(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def match_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> dict:
    """The file's tensors keyed as the module expects; CheckpointError naming any missing/unexpected/misshapen key."""
    expected = module.state_dict(keep_vars=True)
    sd = _adapt_prefix(dict(state_dict), set(expected))
    sd = {k: v for k, v in sd.items() if k in expected or not k.endswith(IGNORABLE_SUFFIXES)}
    name = type(module).__name__
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) the {name} needs are missing: {_name_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) the {name} does not have: {_name_list(unexpected)}")
        hint = ""
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in unexpected):
            hint = "; the weights use the original LDM names: pass the single file itself, not a diffusers folder"
        raise CheckpointError(f"{source}: {'; '.join(parts)}{hint} (does config.json match these weights?)")
    bad = [
        f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in sd.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} shape mismatch(es): {_name_list(bad, 5)} (does config.json match these weights?)"
        )
    wrong_kind = [k for k, v in sd.items() if v.is_floating_point() != expected[k].is_floating_point()]
    if wrong_kind:
        raise CheckpointError(f"{source}: integer/float mismatch for {_name_list(wrong_kind)}")
    return sd


def build_module(
    class_name: str,
    config: dict,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    check_finite: str = "error",
) -> nn.Module:
    """Our module for `class_name`, configured by the diffusers/transformers `config`, holding `state_dict`."""
    cls, _, _ = model_classes(class_name, source)
    cfg = make_config(class_name, config, source)
    with torch.device("meta"):  # a thread-local mode: modules other threads build meanwhile are untouched
        module = cls(cfg)
    sd = match_state_dict(module, state_dict, source)
    module.load_state_dict(sd, strict=True, assign=True)
    unset = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    assert not unset, f"{cls.__name__} holds tensors no state_dict key sets: {unset[:5]}"
    file_memory = {t.untyped_storage().data_ptr() for t in sd.values() if t.device.type == "cpu"}
    module.to(device=device, dtype=dtype or torch.float32)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() in file_memory:
            t.data = t.data.clone()
    module.eval().requires_grad_(False)
    # Scanned where the weights now live (fast on a GPU) and as they will be used: a NaN in the file stays NaN, and
    # a value too large for the requested dtype shows up as Inf.
    _check_finite(module.state_dict(), source, check_finite)
    return module
