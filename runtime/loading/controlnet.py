"""A ControlNet from a diffusers folder (config.json + weights; a pipeline folder's `controlnet/` too), a
diffusers-keyed weight file beside its config.json, or a single file in the original layout (`control_model.*`, its
config inferred from the keys and shapes)."""

import os

import torch

from diffrt.loading import diffusers_folder as df
from diffrt.loading.build import build_module
from diffrt.loading.errors import CheckpointError
from diffrt.loading.formats import read_checkpoint
from diffrt.loading.ldm_controlnet import convert_controlnet, is_ldm_controlnet
from diffrt.loading.single_file import FAMILY_NAMES

CLASS = "ControlNetModel"


def load_controlnet(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    allow_pickle: bool = False,
    check_finite: str = "error",
    unet_config=None,
) -> torch.nn.Module:
    """diffrt's ControlNetModel holding the weights at `path`; CheckpointError naming what does not fit.
    unet_config: the UNetConfig of the model it is for (an original-layout file takes its head counts from it)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if df.is_pipeline_folder(path) and os.path.isdir(os.path.join(path, "controlnet")):
            path = os.path.join(path, "controlnet")
        if not df.is_component_folder(path):
            raise CheckpointError(f"{path}: a folder without config.json; a ControlNet folder holds config.json")
        config = df.read_json(os.path.join(path, "config.json"))
        _check_class(config, path)
        weights = df.find_weights(path, variant, allow_pickle)
        state_dict, source = df.read_weights(weights, allow_pickle), weights.file
    else:
        state_dict, source = read_checkpoint(path, allow_pickle), path
        if is_ldm_controlnet(state_dict):
            state_dict, config, _ = convert_controlnet(state_dict, path, unet_config)
        else:
            config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
            if "controlnet_cond_embedding.conv_in.weight" not in state_dict:
                raise CheckpointError(
                    f"{path}: not a ControlNet (neither the original control_model.*/input_hint_block.* keys nor "
                    "diffusers' controlnet_cond_embedding.* keys)"
                )
            if not os.path.isfile(config_path):
                raise CheckpointError(f"{path}: a diffusers-keyed ControlNet needs its config.json beside it")
            config = df.read_json(config_path)
            _check_class(config, config_path)
    return build_module(CLASS, config, state_dict, source, dtype=dtype, device=device, check_finite=check_finite)


def _check_class(config: dict, where: str) -> None:
    name = df.model_class_name(config, where, default=CLASS)
    if name != CLASS:
        raise CheckpointError(f"{where}: config is for {name!r}, not a {CLASS}")


def check_fits(controlnet: torch.nn.Module, unet: torch.nn.Module, source: str = "ControlNet") -> None:
    """ValueError unless the ControlNet's residuals fit the UNet's skips (and it reads the same conditioning)."""
    a, b = controlnet.config.unet, unet.config
    fields = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
              "projection_class_embeddings_input_dim")  # fmt: skip
    diff = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if diff:
        ours, theirs = FAMILY_NAMES[a.family], FAMILY_NAMES[b.family]
        raise ValueError(
            f"{source} does not fit this model's UNet ({'; '.join(diff)}): it is a {ours} ControlNet "
            f"(cross-attention width {a.cross_attention_dim}) and the model is {theirs}"
        )
