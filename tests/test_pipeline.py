"""Full-pipeline parity with diffusers' StableDiffusion(XL)(Img2Img)Pipeline on the same random weights and latents.

Each family's tiny pipeline (tests/loading_fixtures.py) is saved by diffusers/transformers with a CLIP-format
tokenizer, loaded by `diffrt.Pipeline.from_pretrained`, and both pipelines run the same prompt, latents and seed with
the matching scheduler: the decoded images must agree within 1e-3 (fp32, CPU).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffrt
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
PROMPT = "a photo of a cat, highly detailed"
H, W = 64, 96  # non-square


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def saved(request, tmp_path_factory):
    """(family, folder, diffusers components) for a tiny random pipeline with tokenizers, saved once per module."""
    family = request.param
    root = str(tmp_path_factory.mktemp(family))
    ref = make_pipeline(family, root)
    with open(os.path.join(root, "model_index.json")) as f:
        index = json.load(f)
    # SD1's and SDXL's first tokenizer pad with "<|endoftext|>"; the OpenCLIP ones (SD2, SDXL's second) with "!".
    pads = {"sd1": {"tokenizer": EOS}, "sd2": {"tokenizer": "!"}, "sdxl": {"tokenizer": EOS, "tokenizer_2": "!"}}
    for name, pad in pads[family].items():
        build_clip_vocab(Path(root) / name, pad_token=pad, vocab_size=CLIP_L["vocab_size"])
        index[name] = ["transformers", "CLIPTokenizer"]
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)
    return family, root, {name: module for name, (module, _) in ref.items()}


def diffusers_pipeline(family: str, root: str, modules: dict, sampler: str, img2img: bool = False):
    import diffusers
    from transformers import CLIPTokenizer

    cls_name, extra = SCHEDULERS[sampler]
    base = diffusers.EulerDiscreteScheduler.from_pretrained(os.path.join(root, "scheduler")).config
    scheduler = getattr(diffusers, cls_name).from_config(base, **extra)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    kwargs = {"vae": modules["vae"], "text_encoder": modules["text_encoder"], "unet": modules["unet"]}
    kwargs.update(scheduler=scheduler, tokenizer=tokenizer)
    if family == "sdxl":
        kwargs.update(text_encoder_2=modules["text_encoder_2"],
                      tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2")))  # fmt: skip
        cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(n: int, scale: int, seed: int = 123) -> torch.Tensor:
    return torch.randn((n, 4, H // scale, W // scale), generator=torch.Generator().manual_seed(seed))


def _check(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, f"decoded images differ by up to {err:.2e} (> 1e-3)"
    assert ref.std() > 1e-3, "reference image is flat: the comparison would prove little"


CASES = [  # (sampler, steps, guidance, negative prompt, batch)
    ("euler", 3, 7.5, None, 1),
    ("ddim", 3, 6.0, "blurry, low quality", 2),
    ("euler_a", 3, 5.0, None, 1),
    ("lcm", 2, 1.0, None, 1),
    ("dpmpp_2m_karras", 4, 0.0, None, 2),
]


@pytest.mark.parametrize("sampler,steps,guidance,negative,batch", CASES, ids=[c[0] for c in CASES])
def test_txt2img_matches_diffusers(saved, sampler, steps, guidance, negative, batch):
    family, root, modules = saved
    pipe = diffrt.Pipeline.from_pretrained(root)
    latents = _latents(batch, pipe.vae_scale)
    ours = pipe(PROMPT, negative, height=H, width=W, steps=steps, sampler=sampler, guidance_scale=guidance,
                batch=batch, latents=latents, generator=torch.Generator().manual_seed(7), output_type="np")  # fmt: skip
    ref_pipe = diffusers_pipeline(family, root, modules, sampler)
    with torch.no_grad():
        ref = ref_pipe(PROMPT, negative_prompt=negative, height=H, width=W, num_inference_steps=steps,
                       guidance_scale=guidance, num_images_per_prompt=batch, latents=latents.clone(),
                       generator=torch.Generator().manual_seed(7), output_type="np").images  # fmt: skip
    _check(ours, ref)


@pytest.mark.parametrize("sampler,eta", [("ddim", 1.0), ("tcd", 0.6)])
def test_eta_reaches_the_sampler_as_in_diffusers(saved, sampler, eta):
    """`eta` scales the fresh noise of DDIM and is TCD's gamma; diffusers' pipelines pass the same to step()."""
    family, root, modules = saved
    pipe = diffrt.Pipeline.from_pretrained(root)
    kw = {"height": H, "width": W, "steps": 3, "sampler": sampler, "guidance_scale": 1.0, "output_type": "np"}
    ours = pipe(PROMPT, latents=_latents(1, pipe.vae_scale), generator=torch.Generator().manual_seed(7), eta=eta, **kw)
    default = pipe(PROMPT, latents=_latents(1, pipe.vae_scale), generator=torch.Generator().manual_seed(7), **kw)
    ref_pipe = diffusers_pipeline(family, root, modules, sampler)
    with torch.no_grad():
        ref = ref_pipe(PROMPT, height=H, width=W, num_inference_steps=3, guidance_scale=1.0, eta=eta,
                       latents=_latents(1, pipe.vae_scale), generator=torch.Generator().manual_seed(7),
                       output_type="np").images  # fmt: skip
    _check(ours, ref)
    assert np.abs(ours - default).max() > 1e-3  # the sampler's own eta (0 / 0.3) gives another picture


def test_eta_is_refused_where_it_means_nothing(saved):
    _, root, _ = saved
    pipe = diffrt.Pipeline.from_pretrained(root)
    with pytest.raises(ValueError, match="eta applies to the ddim and tcd samplers only, not 'euler'"):
        pipe(PROMPT, steps=1, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match=r"eta 1.5 must be in \[0, 1\]"):
        pipe(PROMPT, steps=1, sampler="tcd", eta=1.5)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_img2img_matches_diffusers(saved, sampler):
    family, root, modules = saved
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    pipe = diffrt.Pipeline.from_pretrained(root)
    ours = pipe(PROMPT, image=init, strength=0.6, steps=5, sampler=sampler, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(3), output_type="np")  # fmt: skip
    ref_pipe = diffusers_pipeline(family, root, modules, sampler, img2img=True)
    with torch.no_grad():
        ref = ref_pipe(PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=4.0,
                       generator=torch.Generator().manual_seed(3), output_type="np").images  # fmt: skip
    _check(ours, ref)


def test_same_seed_same_image_and_prompt_cache(saved):
    _, root, _ = saved
    pipe = diffrt.Pipeline.from_pretrained(root)
    a = pipe(PROMPT, height=H, width=W, steps=2, sampler="euler_a", seed=11, output_type="np")
    assert len(pipe.prompt_cache) >= 1
    b = pipe(PROMPT, height=H, width=W, steps=2, sampler="euler_a", seed=11, output_type="np")
    c = pipe(PROMPT, height=H, width=W, steps=2, sampler="euler_a", seed=12, output_type="np")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3, "a different seed gave the same image"


def test_no_guidance_skips_the_unconditional_pass(saved):
    """guidance 0 or 1 runs the UNet on the conditional batch only (half the work of CFG)."""
    _, root, _ = saved
    pipe = diffrt.Pipeline.from_pretrained(root)
    batches = []
    hook = pipe.components.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        for guidance in (0.0, 1.0, 3.0):
            batches.clear()
            pipe(PROMPT, height=H, width=W, steps=2, sampler="euler", guidance_scale=guidance, seed=0)
            assert batches == ([2, 2] if guidance > 1 else [1, 1]), (guidance, batches)
    finally:
        hook.remove()


def test_returns_pil_images_and_latents(saved):
    _, root, _ = saved
    pipe = diffrt.Pipeline.from_pretrained(root)
    images, latents = pipe([PROMPT, "a dog"], height=H, width=W, steps=1, batch=2, seed=0, return_latents=True)
    assert [im.size for im in images] == [(W, H)] * 4
    assert latents.shape == (4, 4, H // pipe.vae_scale, W // pipe.vae_scale)


def test_sdxl_micro_conditioning_matches_diffusers(saved):
    family, root, modules = saved
    if family != "sdxl":
        pytest.skip("original_size / crops / target_size condition only SDXL's UNet")
    pipe = diffrt.Pipeline.from_pretrained(root)
    latents = _latents(1, pipe.vae_scale)
    micro = {"original_size": (1024, 768), "crops_coords_top_left": (16, 32), "target_size": (512, 640)}
    ours = pipe(PROMPT, height=H, width=W, steps=2, sampler="euler", guidance_scale=3.0, latents=latents,
                output_type="np", **micro)  # fmt: skip
    plain = pipe(PROMPT, height=H, width=W, steps=2, sampler="euler", guidance_scale=3.0, latents=latents,
                 output_type="np")  # fmt: skip
    assert np.abs(ours - plain).max() > 1e-4, "micro-conditioning changed nothing"
    ref_pipe = diffusers_pipeline(family, root, modules, "euler")
    with torch.no_grad():
        ref = ref_pipe(PROMPT, height=H, width=W, num_inference_steps=2, guidance_scale=3.0, latents=latents.clone(),
                       output_type="np", **micro).images  # fmt: skip
    _check(ours, ref)
