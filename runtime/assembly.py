"""The pipeline's components from a path (diffusers folder or single file) or from a named random-weight preset."""

import json
import os

import torch

from diffrt.loading import CheckpointError, build_module, read_checkpoint_components
from diffrt.pipeline import Components
from diffrt.presets import PRESETS, byte_level_tokenizer
from diffrt.tokenizer import CLIPTokenizer

_DEFAULT_SCHEDULER = {"_class_name": "EulerDiscreteScheduler"}


def components_from_preset(name: str, seed: int = 0) -> Components:
    """The preset's real architectures with seeded random weights (their picture is noise) and a byte-level
    tokenizer. The global RNG is left as it was."""
    from diffrt.models.clip import PRESETS as CLIP_PRESETS
    from diffrt.models.clip import CLIPTextModel
    from diffrt.models.unet import UNet2DConditionModel
    from diffrt.models.unet_config import UNetConfig
    from diffrt.models.vae import AutoencoderKL, AutoencoderKLConfig

    preset = PRESETS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(UNetConfig.preset(preset.unet))
        vae = AutoencoderKL(AutoencoderKLConfig.preset(preset.vae))
        encoders = [CLIPTextModel(CLIP_PRESETS[e]) for e in preset.text_encoders]
    sdxl = len(encoders) == 2
    return Components(
        unet=unet,
        vae=vae,
        tokenizer=byte_level_tokenizer(),
        text_encoder=encoders[0],
        scheduler_config={**_DEFAULT_SCHEDULER, **preset.scheduler},
        tokenizer_2=byte_level_tokenizer() if sdxl else None,
        text_encoder_2=encoders[1] if sdxl else None,
        is_random=True,
    )


def components_from_path(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    tokenizer: str | os.PathLike | None = None,
) -> Components:
    """A diffusers pipeline folder, or a single-file checkpoint plus `tokenizer`: a folder holding `tokenizer/`
    (and `tokenizer_2/` for SDXL), e.g. the matching diffusers pipeline folder."""
    ckpt = read_checkpoint_components(path, variant=variant, allow_pickle=allow_pickle)
    missing = [n for n in ("unet", "vae") if n not in ckpt.components]
    if missing:
        raise CheckpointError(
            f"{path}: a {ckpt.kind} without {' and '.join(missing)}; a pipeline needs a UNet, a VAE and text encoder(s)"
        )
    modules = {
        name: build_module(c.class_name, c.config, c.state_dict, c.source) for name, c in ckpt.components.items()
    }
    folders = dict(ckpt.folders)
    if tokenizer is not None:
        for name in ("tokenizer", "tokenizer_2"):
            sub = os.path.join(tokenizer, name)
            if os.path.isdir(sub):
                folders[name] = sub
        if "tokenizer" not in folders and "tokenizer_2" not in folders:
            folders["tokenizer"] = os.fspath(tokenizer)  # the folder itself holds vocab.json + merges.txt
    tokenizers = {}
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if enc in modules:
            if tok not in folders:
                raise CheckpointError(
                    f"{path}: has a {enc} but no {tok}; a single-file checkpoint carries no tokenizer: pass "
                    f"tokenizer=FOLDER (CLI: --tokenizer) with {tok}/ holding vocab.json and merges.txt"
                )
            tokenizers[tok] = CLIPTokenizer.from_pretrained(folders[tok])
    if "text_encoder" not in modules and "text_encoder_2" not in modules:
        raise CheckpointError(f"{path}: no text encoder; a text-to-image pipeline needs one")
    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        tokenizer=tokenizers.get("tokenizer"),
        text_encoder=modules.get("text_encoder"),
        scheduler_config=ckpt.scheduler_config or _DEFAULT_SCHEDULER,
        tokenizer_2=tokenizers.get("tokenizer_2"),
        text_encoder_2=modules.get("text_encoder_2"),
        force_zeros_for_empty_prompt=_model_index(path).get("force_zeros_for_empty_prompt", True),
    )


def _model_index(path) -> dict:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        return json.load(f)
