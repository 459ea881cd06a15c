"""A model from a path (diffusers folder or single file) or a named random-weight preset: first described (configs
and tokenizers read, weights mapped but not loaded), then built into the pipeline's components."""

import json
import os
from dataclasses import dataclass, replace

import torch

from diffrt.components import Components
from diffrt.loading import Checkpoint, CheckpointError, build_module, read_checkpoint_components
from diffrt.loading.build import make_config
from diffrt.model_spec import ModelSpec, model_spec, spec_of
from diffrt.presets import PRESETS, byte_level_tokenizer
from diffrt.tokenizer import CLIPTokenizer

_DEFAULT_SCHEDULER = {"_class_name": "EulerDiscreteScheduler"}


@dataclass
class ModelSource:
    """A model located and described, not loaded yet: enough to check a request against it before loading."""

    name: str
    spec: ModelSpec
    checkpoint: Checkpoint | None = None  # None for a preset
    tokenizers: tuple[CLIPTokenizer | None, CLIPTokenizer | None] = (None, None)
    seed: int = 0  # a preset's random weights

    def components(self, device: str | torch.device | None = None) -> Components:
        """Build the modules (a preset's random weights are drawn on `device` itself: fast on a GPU)."""
        if self.checkpoint is None:
            return components_from_preset(self.name, self.seed, self.spec.scheduler_config, device)
        return _components_from_checkpoint(self.checkpoint, self.spec, self.tokenizers)


def open_model(
    path_or_preset: str | os.PathLike,
    *,
    variant: str | None = None,
    allow_pickle: bool = False,
    tokenizer: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    seed: int = 0,
) -> ModelSource:
    """Describe the model at a diffusers folder or single-file checkpoint (plus `tokenizer`: a folder holding
    `tokenizer/` and `tokenizer_2/` for SDXL, e.g. the matching diffusers folder), or a preset name
    (diffrt.presets.PRESETS). prediction_type overrides the scheduler config's ("epsilon" / "v_prediction")."""
    override = {} if prediction_type is None else {"prediction_type": prediction_type}
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        preset = PRESETS[path_or_preset]
        spec = spec_of(components_from_preset(path_or_preset, seed, device="meta"))
        scheduler = {**_DEFAULT_SCHEDULER, **preset.scheduler, **override}
        return ModelSource(path_or_preset, replace(spec, scheduler_config=scheduler), seed=seed)
    path = os.fspath(path_or_preset)
    ckpt = read_checkpoint_components(path, variant=variant, allow_pickle=allow_pickle)
    missing = [n for n in ("unet", "vae") if n not in ckpt.components]
    if missing:
        raise CheckpointError(
            f"{path}: a {ckpt.kind} without {' and '.join(missing)}; a pipeline needs a UNet, a VAE and text encoder(s)"
        )
    if "text_encoder" not in ckpt.components and "text_encoder_2" not in ckpt.components:
        raise CheckpointError(f"{path}: no text encoder; a text-to-image pipeline needs one")
    configs = {name: make_config(c.class_name, c.config, c.source) for name, c in ckpt.components.items()}
    spec = model_spec(
        configs["unet"],
        configs["vae"],
        (configs.get("text_encoder"), configs.get("text_encoder_2")),
        {**(ckpt.scheduler_config or _DEFAULT_SCHEDULER), **override},
        sum(t.numel() for c in ckpt.components.values() for t in c.state_dict.values() if t.is_floating_point()),
        force_zeros_for_empty_prompt=_model_index(path).get("force_zeros_for_empty_prompt", True),
    )
    return ModelSource(path, spec, ckpt, _tokenizers(path, ckpt, tokenizer))


def components_from_preset(name: str, seed: int = 0, scheduler_config: dict | None = None, device=None) -> Components:
    """The preset's real architectures with seeded random weights (their picture is noise) and a byte-level
    tokenizer. The global CPU RNG is left as it was (on a GPU the weights come from its own RNG, seeded here).
    device="meta" builds the shapes only (no memory, no init)."""
    from diffrt.models.clip import PRESETS as CLIP_PRESETS
    from diffrt.models.clip import CLIPTextModel
    from diffrt.models.unet import UNet2DConditionModel
    from diffrt.models.unet_config import UNetConfig
    from diffrt.models.vae import AutoencoderKL, AutoencoderKLConfig

    preset = PRESETS[name]
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
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
        scheduler_config=scheduler_config or {**_DEFAULT_SCHEDULER, **preset.scheduler},
        tokenizer_2=byte_level_tokenizer() if sdxl else None,
        text_encoder_2=encoders[1] if sdxl else None,
        is_random=True,
    )


def _components_from_checkpoint(
    ckpt: Checkpoint, spec: ModelSpec, tokenizers: tuple[CLIPTokenizer | None, CLIPTokenizer | None]
) -> Components:
    modules = {
        name: build_module(c.class_name, c.config, c.state_dict, c.source) for name, c in ckpt.components.items()
    }
    return Components(
        unet=modules["unet"],
        vae=modules["vae"],
        tokenizer=tokenizers[0],
        text_encoder=modules.get("text_encoder"),
        scheduler_config=spec.scheduler_config,
        tokenizer_2=tokenizers[1],
        text_encoder_2=modules.get("text_encoder_2"),
        force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt,
    )


def _tokenizers(path: str, ckpt: Checkpoint, tokenizer: str | os.PathLike | None):
    """The CLIP tokenizer(s) for the checkpoint's text encoder(s): its own folders, or those under `tokenizer`."""
    folders = dict(ckpt.folders)
    if tokenizer is not None:
        for name in ("tokenizer", "tokenizer_2"):
            sub = os.path.join(tokenizer, name)
            if os.path.isdir(sub):
                folders[name] = sub
        if "tokenizer" not in folders and "tokenizer_2" not in folders:
            folders["tokenizer"] = os.fspath(tokenizer)  # the folder itself holds vocab.json + merges.txt
    found = []
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if enc not in ckpt.components:
            found.append(None)
            continue
        if tok not in folders:
            raise CheckpointError(
                f"{path}: has a {enc} but no {tok}; a single-file checkpoint carries no tokenizer: pass "
                f"tokenizer=FOLDER (CLI: --tokenizer) with {tok}/ holding vocab.json and merges.txt"
            )
        found.append(CLIPTokenizer.from_pretrained(folders[tok]))
    return tuple(found)


def _model_index(path) -> dict:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        return json.load(f)
