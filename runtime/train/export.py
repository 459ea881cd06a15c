"""Component folders and the exported pipeline: a diffusers-format folder (fp16 safetensors, configs, tokenizer,
scheduler config) that `diffrt.Pipeline.from_pretrained` and diffusers' `StableDiffusionPipeline.from_pretrained`
both load.

Layout of a finished run: vae/model, text/model, unet/model + unet/text_model (EMA weights), lcm/model (the
distilled student's EMA target, as LCM's authors release), tokenizer/. `export_pipeline` assembles the student (with
LCMScheduler) or the teacher (with DDIMScheduler, SD's config) from them.
"""

import json
import os
import shutil

import torch
from safetensors.torch import load_file

from diffrt.train.checkpoint import atomic_save_file, atomic_write_json, read_state
from diffrt.train.recipes import NOISE_SCHEDULE

DIFFUSERS_VERSION = "0.42.1"  # the version whose format these files follow (and that the tests load them with)
WEIGHTS = {name: "diffusion_pytorch_model" for name in ("UNet2DConditionModel", "AutoencoderKL", "ControlNetModel")}
SCHEDULERS = {
    # LCMScheduler on SD's noise schedule; original_inference_steps is the DDIM solver's step count the student was
    # distilled on (recipes.STAGES["lcm"] ddim_steps; export_pipeline writes the run's value).
    "student": {
        "_class_name": "LCMScheduler",
        **NOISE_SCHEDULE,
        "original_inference_steps": 50,
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_scaling": 10.0,
        "timestep_spacing": "leading",
    },
    # Stable Diffusion v1.5's scheduler_config.json (PNDM there; DDIM, as the teacher is sampled with).
    "teacher": {
        "_class_name": "DDIMScheduler",
        **NOISE_SCHEDULE,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    },
}


def _class_name(config: dict) -> str:
    return config.get("_class_name") or config["architectures"][0]


def save_component(folder: str, config: dict, state_dict: dict, dtype: torch.dtype | None = None) -> None:
    """A diffusers (UNet, VAE) or transformers (CLIP text) component folder: config.json + safetensors weights."""
    os.makedirs(folder, exist_ok=True)
    name = _class_name(config)
    stem = WEIGHTS.get(name, "model")
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state_dict.items()}
    atomic_save_file(tensors, os.path.join(folder, f"{stem}.safetensors"), metadata={"format": "pt"})
    if "_class_name" in config:
        config = {**config, "_diffusers_version": DIFFUSERS_VERSION}
    atomic_write_json(config, os.path.join(folder, "config.json"))


def read_component(folder: str) -> tuple[dict, dict]:
    """(config, state_dict) of a folder written by save_component."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    stem = WEIGHTS.get(_class_name(config), "model")
    return config, load_file(os.path.join(folder, f"{stem}.safetensors"))


def export_pipeline(run: str, out: str, which: str = "student", max_mb: float | None = None) -> int:
    """Write the run's student or teacher as a diffusers pipeline folder with fp16 weights; returns its size in
    bytes. The text encoder is the one fine-tuned with the UNet (EMA), which the student was distilled with too."""
    if which not in SCHEDULERS:
        raise ValueError(f"which {which!r} must be 'student' or 'teacher'")
    unet = os.path.join(run, "lcm" if which == "student" else "unet", "model")
    sources = {
        "unet": unet,
        "vae": os.path.join(run, "vae", "model"),
        "text_encoder": os.path.join(run, "unet", "text_model"),
    }
    for folder in sources.values():
        if not os.path.isfile(os.path.join(folder, "config.json")):
            stage = os.path.basename(os.path.dirname(folder))
            raise ValueError(f"{folder} does not exist: finish `diffrt train {stage} {run}` first")
    os.makedirs(out, exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", SCHEDULERS[which]["_class_name"]],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    for name, folder in sources.items():
        config, state = read_component(folder)
        if "_class_name" not in config:
            # transformers 5 loads in the config's dtype (else the weights'): say float32, as SD's repos do beside
            # fp16 weights, so that diffusers' from_pretrained gives fp32 everywhere unless a dtype is passed.
            config = {**config, "torch_dtype": "float32"}
        save_component(os.path.join(out, name), config, state, torch.float16)
        index[name] = ["diffusers" if "_class_name" in config else "transformers", _class_name(config)]
    tokenizer = os.path.join(out, "tokenizer")
    shutil.rmtree(tokenizer, ignore_errors=True)
    shutil.copytree(os.path.join(run, "tokenizer"), tokenizer)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    scheduler = {**SCHEDULERS[which], "_diffusers_version": DIFFUSERS_VERSION}
    if which == "student":
        scheduler["original_inference_steps"] = read_state(os.path.join(run, "lcm"))["settings"]["extra"]["ddim_steps"]
    atomic_write_json(scheduler, os.path.join(out, "scheduler", "scheduler_config.json"))
    atomic_write_json(index, os.path.join(out, "model_index.json"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
    if max_mb is not None and size > max_mb * 2**20:
        raise ValueError(f"{out} is {size / 2**20:.1f} MB, over the {max_mb} MB limit; choose a smaller architecture")
    return size
