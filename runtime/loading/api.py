"""The loading entry points: what a path holds (`read_checkpoint_components`), and one module from it (`load_model`).

A path is one of: a diffusers pipeline folder (model_index.json), a component folder (config.json + weights), a
single-file LDM/SGM checkpoint, or a diffusers-named weight file beside its config.json.
"""

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from diffrt.loading import diffusers_folder as df
from diffrt.loading.build import MODELS, build_module
from diffrt.loading.errors import CheckpointError
from diffrt.loading.formats import read_checkpoint
from diffrt.loading.single_file import FAMILY_NAMES, Component, is_single_file, split_single_file


@dataclass
class Checkpoint:
    """Everything loadable at a path, as diffusers components (weights + config), and how that was determined."""

    path: str
    kind: str  # "pipeline folder", "component folder", "single file"
    family: str | None  # "sd1" / "sd2" / "sdxl", or None when the weights do not say
    components: dict[str, Component]
    reasons: list[str] = field(default_factory=list)
    scheduler_config: dict | None = None
    folders: dict[str, str] = field(default_factory=dict)  # tokenizer/scheduler folders of a pipeline folder
    skipped: dict[str, str] = field(default_factory=dict)  # pipeline components diffrt does not load: {name: class}
    ignored_keys: list[str] = field(default_factory=list)


def unet_family(config: dict) -> tuple[str, str]:
    """(family, reason) from a diffusers UNet config: SDXL adds text_time conditioning, SD2 projects linearly."""
    ctx = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time":
        return "sdxl", f"unet config: addition_embed_type text_time, cross_attention_dim {ctx}"
    if config.get("use_linear_projection"):
        return "sd2", f"unet config: use_linear_projection, cross_attention_dim {ctx}"
    return "sd1", f"unet config: conv projections, no added conditioning, cross_attention_dim {ctx}"


def _component_from_folder(
    name: str, folder: str, variant: str | None, allow_pickle: bool, class_name: str | None = None
) -> Component:
    config_path = os.path.join(folder, "config.json")
    config = df.read_json(config_path)
    class_name = df.model_class_name(config, config_path, default=class_name)
    weights = df.find_weights(folder, variant, allow_pickle)
    state_dict = df.read_weights(weights, allow_pickle)
    if class_name == "AutoencoderKL":  # diffusers < 0.14 named the mid attention query/key/value/proj_attn
        from diffrt.models.vae import rename_deprecated_attention_keys

        state_dict = rename_deprecated_attention_keys(state_dict)
    return Component(name, class_name, config, state_dict, weights.file)


def _component_from_file(path: str, allow_pickle: bool) -> Component:
    """A diffusers-named weight file (not LDM keys) loaded with the config.json in its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{path}: neither an LDM/SGM single-file checkpoint (no model.diffusion_model.*, first_stage_model.*, "
            "cond_stage_model.*, conditioner.* keys) nor a weight file with a config.json beside it"
        )
    config = df.read_json(config_path)
    class_name = df.model_class_name(config, config_path)
    state_dict = read_checkpoint(path, allow_pickle)
    if class_name == "AutoencoderKL":  # diffusers < 0.14 named the mid attention query/key/value/proj_attn
        from diffrt.models.vae import rename_deprecated_attention_keys

        state_dict = rename_deprecated_attention_keys(state_dict)
    return Component(os.path.basename(folder), class_name, config, state_dict, path)


def read_checkpoint_components(
    path: str | os.PathLike,
    components: list[str] | None = None,
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> Checkpoint:
    """Weights (diffusers/transformers key names) and configs of the components at `path`.

    `components` limits which are read from a pipeline folder (default: all that diffrt can build). Tensors from
    safetensors are memory-mapped, so reading is cheap until they are used.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if df.is_pipeline_folder(path):
            entries = df.pipeline_components(path)
            ckpt = Checkpoint(path, "pipeline folder", None, {})
            for name, (_, class_name) in entries.items():
                sub = os.path.join(path, name)
                if class_name in MODELS:
                    if components is None or name in components:
                        ckpt.components[name] = _component_from_folder(name, sub, variant, allow_pickle, class_name)
                elif os.path.isdir(sub) and ("Tokenizer" in class_name or "Scheduler" in class_name):
                    ckpt.folders[name] = sub
                else:
                    ckpt.skipped[name] = class_name
            for name in components or []:
                if name not in ckpt.components:
                    have = [n for n, (_, c) in entries.items() if c in MODELS]
                    raise CheckpointError(f"{path}: no component {name!r}; this pipeline has {', '.join(have)}")
            sched = os.path.join(path, "scheduler", "scheduler_config.json")
            if os.path.isfile(sched):
                ckpt.scheduler_config = df.read_json(sched)
                pred = ckpt.scheduler_config.get("prediction_type", "epsilon")
                ckpt.reasons.append(f"prediction_type {pred} (scheduler/scheduler_config.json)")
        elif df.is_component_folder(path):
            comp = _component_from_folder(os.path.basename(os.path.normpath(path)), path, variant, allow_pickle)
            ckpt = Checkpoint(path, "component folder", None, {comp.name: comp})
        else:
            raise CheckpointError(f"{path}: a folder without model_index.json (pipeline) or config.json (component)")
        unet = next((c for c in ckpt.components.values() if c.class_name == "UNet2DConditionModel"), None)
        if unet is not None:
            ckpt.family, why = unet_family(unet.config)
            ckpt.reasons.insert(0, why)
        return ckpt

    tensors = read_checkpoint(path, allow_pickle)
    if not is_single_file(tensors):
        comp = _component_from_file(path, allow_pickle)
        return Checkpoint(path, "component file", None, {comp.name: comp})
    sf = split_single_file(tensors, path)
    if components is not None:
        for name in components:
            if name not in sf.components:
                raise CheckpointError(f"{path}: no component {name!r}; this file has {', '.join(sf.components)}")
        sf.components = {n: c for n, c in sf.components.items() if n in components}
    return Checkpoint(
        path, "single file", sf.family, sf.components, sf.reasons, sf.scheduler_config, ignored_keys=sf.ignored
    )


def load_model(
    path: str | os.PathLike,
    component: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    allow_pickle: bool = False,
    check_finite: str = "error",
) -> nn.Module:
    """One module (UNet, VAE, TAESD, text encoder) from a component folder, or from a pipeline folder or single
    file with `component=` ("unet", "vae", "text_encoder", "text_encoder_2", ...).

    dtype: the parameters' dtype (default float32, as diffusers/transformers load). variant: e.g. "fp16" for
    `*.fp16.safetensors`. allow_pickle: read .ckpt/.pt/.bin with torch.load(weights_only=True); off by default
    because unpickling can run code. check_finite: "error" (default) refuses weights with NaN/Inf and names them,
    "warn" warns, "off" skips the scan (one reduction over each tensor).
    """
    ckpt = read_checkpoint_components(
        path, [component] if component else None, variant=variant, allow_pickle=allow_pickle
    )
    if component is None:
        if len(ckpt.components) != 1:
            fam = f" ({FAMILY_NAMES[ckpt.family]})" if ckpt.family else ""
            raise CheckpointError(
                f"{path}: a {ckpt.kind}{fam} with components {', '.join(ckpt.components)}; "
                "choose one with component=..."
            )
        component = next(iter(ckpt.components))
    elif component not in ckpt.components and len(ckpt.components) == 1 and ckpt.kind.startswith("component"):
        component = next(iter(ckpt.components))  # a component folder is that component, whatever its folder name
    comp = ckpt.components[component]
    return build_module(
        comp.class_name,
        comp.config,
        comp.state_dict,
        comp.source,
        dtype=dtype,
        device=device,
        check_finite=check_finite,
    )
