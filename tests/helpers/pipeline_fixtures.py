"""Test-only: a tiny random pipeline of each family saved with CLIP-format tokenizers (what diffrt and diffusers both
load), and the diffusers pipeline (txt2img, img2img, with ControlNets) built on the same modules."""

import json
import os
from pathlib import Path

import numpy as np

from tests.helpers.clip_vocab import EOS, build_clip_vocab
from tests.helpers.loading_fixtures import CLIP_L, make_pipeline

SCHEDULERS = {  # our sampler -> (diffusers scheduler class, extra config)
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),  # as every SD config sets it; the class default is True
    "lcm": ("LCMScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "tcd": ("TCDScheduler", {}),
}


def save_pipeline(family: str, root: str, seed: int = 0) -> dict:
    """A tiny random pipeline of `family` with tokenizers under root/; returns {component: diffusers module}."""
    ref = make_pipeline(family, root, seed)
    with open(os.path.join(root, "model_index.json")) as f:
        index = json.load(f)
    # SD1's and SDXL's first tokenizer pad with "<|endoftext|>"; the OpenCLIP ones (SD2, SDXL's second) with "!".
    pads = {"sd1": {"tokenizer": EOS}, "sd2": {"tokenizer": "!"}, "sdxl": {"tokenizer": EOS, "tokenizer_2": "!"}}
    for name, pad in pads[family].items():
        build_clip_vocab(Path(root) / name, pad_token=pad, vocab_size=CLIP_L["vocab_size"])
        index[name] = ["transformers", "CLIPTokenizer"]
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)
    return {name: module for name, (module, _) in ref.items()}


def diffusers_pipeline(family: str, root: str, modules: dict, sampler: str, img2img: bool = False, controlnet=None):
    """diffusers' StableDiffusion(XL)[ControlNet][Img2Img]Pipeline on `modules` (controlnet: a ControlNetModel or a
    list of them)."""
    import diffusers
    from transformers import CLIPTokenizer

    cls_name, extra = SCHEDULERS[sampler]
    base = diffusers.EulerDiscreteScheduler.from_pretrained(os.path.join(root, "scheduler")).config
    scheduler = getattr(diffusers, cls_name).from_config(base, **extra)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    kwargs = {"vae": modules["vae"], "text_encoder": modules["text_encoder"], "unet": modules["unet"]}
    kwargs.update(scheduler=scheduler, tokenizer=tokenizer)
    kind = ("ControlNet" if controlnet is not None else "") + ("Img2Img" if img2img else "")
    if controlnet is not None:
        kwargs["controlnet"] = controlnet
    if family == "sdxl":
        kwargs.update(text_encoder_2=modules["text_encoder_2"],
                      tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2")))  # fmt: skip
        cls = getattr(diffusers, f"StableDiffusionXL{kind}Pipeline")
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        cls = getattr(diffusers, f"StableDiffusion{kind}Pipeline")
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_images(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-3) -> None:
    """Decoded images within `tol` of diffusers', and the reference not flat (a flat one would prove little)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    assert err <= tol, f"decoded images differ by up to {err:.2e} (> {tol:.0e})"
    assert ref.std() > 1e-3, "reference image is flat: the comparison would prove little"
