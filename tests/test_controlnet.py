"""ControlNet: our module against diffusers' ControlNetModel, loading (folder, diffusers file, original single file),
and whole pipelines against StableDiffusion(XL)ControlNet(Img2Img)Pipeline with one and two ControlNets."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import diffrt
from diffrt.loading import CheckpointError
from diffrt.loading.controlnet import load_controlnet
from diffrt.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_from_unet
from tests.helpers.loading_fixtures import UNETS
from tests.helpers.parity import assert_parity
from tests.helpers.pipeline_fixtures import check_images, diffusers_pipeline, save_pipeline

PROMPT = "a photo of a cat, highly detailed"
H, W = 64, 96  # the tiny VAE's scale is 2: latents 32 x 48


def reference_controlnet(unet, seed: int, hint=(8, 16)):
    """diffusers' ControlNetModel shaped after `unet`, every weight random (zero convs too: zero ones prove little)."""
    from diffusers import ControlNetModel as Reference

    torch.manual_seed(seed)
    ref = Reference.from_unet(unet, conditioning_embedding_out_channels=hint)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    return ref.eval()


def control_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_module_matches_diffusers(family):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = reference_controlnet(UNet2DConditionModel(**UNETS[family]), 1, hint=(8, 8, 16, 16))
    ours = ControlNetModel(ControlNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    x, image = torch.randn(2, 4, 8, 12, generator=g), torch.rand(2, 3, 64, 96, generator=g)
    ctx = torch.randn(2, 77, UNETS[family]["cross_attention_dim"], generator=g)
    extra = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    extra = extra if family == "sdxl" else {}
    with torch.no_grad():
        down, mid = ref(x, torch.tensor(421.0), ctx, image, conditioning_scale=0.7, added_cond_kwargs=extra or None,
                        return_dict=False)  # fmt: skip
        our_down, our_mid = ours(x, torch.tensor(421.0), ctx, image, 0.7, **extra)
    assert len(our_down) == len(down)
    for a, b in zip(our_down, down, strict=True):
        assert_parity(a, b)
    assert_parity(our_mid, mid)


def test_from_unet_starts_as_the_bare_unet():
    """The paper's initialisation: encoder copied, output convs zero, so every residual is zero."""
    unet = diffrt.load_model(_saved("sd1")[1], component="unet")
    controlnet, config = controlnet_from_unet(unet, channels=(8, 16))
    assert ControlNetConfig.from_diffusers(config) == controlnet.config
    torch.testing.assert_close(
        controlnet.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight
    )
    down, mid = controlnet(torch.randn(1, 4, 8, 8), 10.0, torch.randn(1, 77, 64), torch.rand(1, 3, 16, 16))
    assert all(not d.any() for d in down) and not mid.any()


_SAVED: dict = {}


def _saved(family: str):
    """A tiny pipeline of `family` and two ControlNets for it (diffusers folders), made once per test session."""
    if family not in _SAVED:
        import tempfile

        root = tempfile.mkdtemp(prefix=f"controlnet-{family}-")
        modules = save_pipeline(family, os.path.join(root, "pipe"))
        nets = [reference_controlnet(modules["unet"], seed) for seed in (1, 2)]
        for i, net in enumerate(nets):
            net.save_pretrained(os.path.join(root, f"controlnet{i}"))
        _SAVED[family] = (modules, os.path.join(root, "pipe"), [os.path.join(root, f"controlnet{i}") for i in (0, 1)],
                          nets)  # fmt: skip
    return _SAVED[family]


def _latents(seed: int = 123) -> torch.Tensor:
    return torch.randn((1, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(seed))


CASES = [  # (family, ControlNets, guidance, scales, starts, ends)
    ("sd1", 1, 6.0, 0.8, 0.0, 1.0),
    ("sd1", 2, 5.0, [0.7, 1.3], [0.0, 0.4], [0.6, 1.0]),  # the second joins after the first stops
    ("sdxl", 1, 1.0, 1.0, 0.0, 1.0),
    ("sdxl", 2, 4.0, [1.0, 0.5], 0.0, [1.0, 0.5]),
]


@pytest.mark.parametrize("family,count,guidance,scale,start,end", CASES,
                         ids=[f"{c[0]}-{c[1]}net-cfg{c[2]:g}" for c in CASES])  # fmt: skip
def test_txt2img_matches_diffusers(family, count, guidance, scale, start, end):
    modules, root, folders, nets = _saved(family)
    pipe = diffrt.Pipeline.from_pretrained(root, controlnet=folders[:count])
    images = control_images(count)
    kw = {"controlnet_conditioning_scale": scale, "control_guidance_start": start, "control_guidance_end": end}
    ours = pipe(PROMPT, height=H, width=W, steps=4, sampler="euler", guidance_scale=guidance, latents=_latents(),
                control_image=images if count > 1 else images[0], output_type="np", **kw)  # fmt: skip
    ref_pipe = diffusers_pipeline(family, root, modules, "euler", controlnet=nets[:count] if count > 1 else nets[0])
    with torch.no_grad():
        ref = ref_pipe(PROMPT, image=images if count > 1 else images[0], height=H, width=W, num_inference_steps=4,
                       guidance_scale=guidance, latents=_latents(), output_type="np", **kw).images  # fmt: skip
    check_images(ours, ref)
    plain = diffrt.Pipeline.from_pretrained(root)(
        PROMPT,
        height=H,
        width=W,
        steps=4,
        sampler="euler",
        guidance_scale=guidance,
        latents=_latents(),
        output_type="np",
    )
    assert np.abs(ours - plain).max() > 1e-2, "the ControlNet changed nothing"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_img2img_matches_diffusers(family):
    modules, root, folders, nets = _saved(family)
    pipe = diffrt.Pipeline.from_pretrained(root, controlnet=folders[0])
    init, control = control_images(2, seed=5)
    kw = {"controlnet_conditioning_scale": 0.9, "control_guidance_end": 0.8}  # (diffusers' img2img default scale: 0.8)
    ours = pipe(PROMPT, image=init, strength=0.7, steps=5, sampler="ddim", guidance_scale=3.0, control_image=control,
                generator=torch.Generator().manual_seed(3), output_type="np", **kw)  # fmt: skip
    ref_pipe = diffusers_pipeline(family, root, modules, "ddim", img2img=True, controlnet=nets[0])
    with torch.no_grad():
        ref = ref_pipe(PROMPT, image=init, control_image=control, strength=0.7, num_inference_steps=5,
                       guidance_scale=3.0, generator=torch.Generator().manual_seed(3), output_type="np",
                       **kw).images  # fmt: skip
    check_images(ours, ref)


def test_steps_outside_the_guidance_window_run_no_controlnet():
    _, root, folders, _ = _saved("sd1")
    pipe = diffrt.Pipeline.from_pretrained(root, controlnet=folders)
    calls = []
    hooks = [
        c.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i, c in enumerate(pipe.components.controlnets)
    ]
    pipe(
        PROMPT,
        height=H,
        width=W,
        steps=4,
        sampler="euler",
        control_image=control_images(2),
        seed=0,
        control_guidance_start=[0.0, 0.5],
        control_guidance_end=[0.5, 1.0],
        controlnet_conditioning_scale=[1.0, 0.0],
    )
    for h in hooks:
        h.remove()
    assert calls == [0, 0], calls  # the first on steps 0-1; the second's window holds steps 2-3 but its scale is 0
    plan = pipe.plan(pipe.resolve(diffrt.GenerationRequest(PROMPT, steps=4, control_image=control_images(2),
                                                           controlnet_conditioning_scale=[0.5, 2.0])))  # fmt: skip
    assert plan.control.active == ((True, True),) * 4 and plan.control.scales.tolist() == [[0.5, 2.0]] * 4
    assert plan.control.images[0].shape == (2, 3, H, W)  # the output's size by default, doubled under CFG
    assert plan.control.bucket in plan.bucket  # which ControlNets run at which step fixes the graph


def test_single_file_and_diffusers_file_load_the_same_weights(tmp_path):
    from tests.helpers.ldm_keys import controlnet_to_ldm

    _, _, folders, nets = _saved("sdxl")
    expected = load_controlnet(folders[0]).state_dict()
    ldm = controlnet_to_ldm(nets[0].state_dict(), dict(nets[0].config))
    save_file({f"control_model.{k}": v.contiguous() for k, v in ldm.items()}, tmp_path / "cldm.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "bare.safetensors")
    unet_config = diffrt.load_model(os.path.join(_saved("sdxl")[1], "unet")).config  # the tiny heads and time ids
    for name in ("cldm.safetensors", "bare.safetensors"):
        loaded = load_controlnet(tmp_path / name, unet_config=unet_config)
        assert loaded.config == load_controlnet(folders[0]).config
        assert loaded.state_dict().keys() == expected.keys()
        assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
    weights = os.path.join(folders[0], "diffusion_pytorch_model.safetensors")
    assert torch.equal(load_controlnet(weights).state_dict()["controlnet_mid_block.weight"],
                       expected["controlnet_mid_block.weight"])  # fmt: skip


def test_loading_errors_name_the_problem(tmp_path):
    _, sd1_root, _, _ = _saved("sd1")
    _, _, xl_folders, _ = _saved("sdxl")
    with pytest.raises(
        ValueError, match=r"does not fit this model's UNet .* it is a SDXL ControlNet .* model is SD1.x"
    ):
        diffrt.Pipeline.from_pretrained(sd1_root, controlnet=xl_folders[0])
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a ControlNetModel"):
        load_controlnet(os.path.join(sd1_root, "unet"))


def test_request_checks_name_each_mistake():
    _, root, folders, _ = _saved("sd1")
    plain = diffrt.Pipeline.from_pretrained(root)
    with pytest.raises(ValueError, match="this pipeline has no ControlNet; add one with pipe.load_controlnet"):
        plain(PROMPT, steps=1, control_image=control_images(1)[0])
    pipe = diffrt.Pipeline.from_pretrained(root, controlnet=folders)
    with pytest.raises(ValueError, match=r"has 2 ControlNet\(s\): give control_image"):
        pipe(PROMPT, steps=1)
    with pytest.raises(ValueError) as e:
        pipe(PROMPT, steps=1, control_image=control_images(1), controlnet_conditioning_scale=[1.0, 2.0, 3.0],
             control_guidance_start=0.7, control_guidance_end=0.5)  # fmt: skip
    message = str(e.value)
    assert "1 control images for 2 ControlNet(s)" in message
    assert "controlnet_conditioning_scale [1.0, 2.0, 3.0] must be a finite number or a list of 2" in message
    assert "ControlNet 0: control guidance start 0.7 and end 0.5 must satisfy 0 <= start < end <= 1" in message
    with pytest.raises(ValueError, match=r"control image 1 is a tensor of \(8, 8\) \(H, W\) but the output is"):
        pipe(PROMPT, steps=1, height=H, width=W, control_image=[control_images(1)[0], torch.rand(3, 8, 8)])


def test_cli_flags_give_the_python_api_picture(tmp_path):
    from diffrt.cli import main
    from diffrt.cli_generate import DEFAULT_CONTROLNET
    from tests.test_lora import saved as saved_lora

    _, root, folders, _ = _saved("sd1")
    _, _, lora_files, _ = saved_lora("sd1")
    control = control_images(1)[0]
    control.save(tmp_path / "control.png")
    out = tmp_path / "out.png"
    args = [
        "generate",
        "-p",
        PROMPT,
        "--model",
        root,
        "-W",
        str(W),
        "-H",
        str(H),
        "--steps",
        "2",
        "--seed",
        "5",
        "--sampler",
        "euler",
        "--controlnet",
        folders[0],
        "--control-image",
        str(tmp_path / "control.png"),
        "--control-scale",
        "0.6",
        "--control-end",
        "0.5",
        "--lora",
        f"{lora_files['kohya'][0]}:0.7",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    pipe = diffrt.Pipeline.from_pretrained(root, controlnet=folders[0])
    pipe.load_lora(lora_files["kohya"][0], scale=0.7)
    expected = pipe(PROMPT, height=H, width=W, steps=2, sampler="euler", seed=5, control_image=control,
                    controlnet_conditioning_scale=0.6, control_guidance_end=0.5)[0]  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    mismatch = ["generate", "-p", PROMPT, "--model", root, "--control-image", str(tmp_path / "control.png"), "-o",
                str(tmp_path / "x.png")]  # fmt: skip
    assert main(mismatch) == 2 and not (tmp_path / "x.png").exists()
    # the embedded model with its shipped ControlNet: the shapes land where a fresh mask puts them
    from diffrt.train.controlnet import EVAL_SEED_START, control_sample, generated_mask, iou

    _, mask, labels = control_sample(EVAL_SEED_START + 7)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    from diffrt.train import shapes

    alone = ["generate", "-p", shapes.caption(labels), "--control-image", str(tmp_path / "mask.png"), "--seed", "3",
             "-o", str(tmp_path / "y.png")]  # fmt: skip
    assert main(alone) == 0 and os.path.isdir(DEFAULT_CONTROLNET)
    assert iou(generated_mask(np.asarray(Image.open(tmp_path / "y.png")), labels), mask[..., 0] > 127) >= 0.7
