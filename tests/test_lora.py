"""LoRA: diffusers/PEFT- and kohya-layout files on the tiny SD1 and SDXL pipelines against diffusers' load_lora_weights
+ fuse_lora (UNet) and PEFT's merge (text encoders), images within 1e-3; several LoRAs with scales; unfusing restores
every weight bit for bit, in the same tensors; switching changes the next image and the prompt cache; errors."""

import os
import tempfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffrt
from diffrt.loading import CheckpointError
from tests.helpers.lora_fixtures import (
    TEXT_TARGETS,
    UNET_TARGETS,
    random_pairs,
    reference_with_lora,
    save_kohya_layout,
    save_peft_layout,
)
from tests.helpers.pipeline_fixtures import check_images, save_pipeline

PROMPT = "a photo of a cat, highly detailed"
H, W = 64, 96
RANK = 4
ALPHAS = {"unet": 8.0, "text_encoder": 2.0, "text_encoder_2": 2.0}  # one text alpha: PEFT's reference takes one
_SAVED: dict = {}


def saved(family: str):
    """(root, diffusers modules, {layout: (file, UNet-only file)}, LoRA pairs by component), made once per session."""
    if family not in _SAVED:
        root = tempfile.mkdtemp(prefix=f"lora-{family}-")
        modules = save_pipeline(family, os.path.join(root, "pipe"))
        encoders = [n for n in ("text_encoder", "text_encoder_2") if n in modules]
        parts = {"unet": random_pairs(modules["unet"], UNET_TARGETS, RANK, 1)}
        parts.update({n: random_pairs(modules[n], TEXT_TARGETS, RANK, 2 + i) for i, n in enumerate(encoders)})
        unet_config = dict(modules["unet"].config)
        files = {}
        for layout in ("diffusers", "kohya"):
            full, unet_only = (os.path.join(root, f"{layout}{s}.safetensors") for s in ("", "-unet"))
            for path, chosen in ((full, parts), (unet_only, {"unet": parts["unet"]})):
                if layout == "diffusers":
                    save_peft_layout(path, chosen, RANK, ALPHAS)
                else:
                    save_kohya_layout(path, chosen, family, unet_config, ALPHAS)
            files[layout] = (full, unet_only)
        _SAVED[family] = (os.path.join(root, "pipe"), modules, files, parts)
    return _SAVED[family]


CASES = [  # (family, layout, sampler, steps, guidance, scale)
    ("sd1", "diffusers", "euler", 3, 5.0, 0.8),
    ("sd1", "kohya", "lcm", 2, 1.0, 1.0),  # LCM-LoRA's use: conv + attention layers, LCM sampler, no CFG
    ("sdxl", "diffusers", "euler", 3, 4.0, 1.0),
    ("sdxl", "kohya", "euler", 3, 1.0, 0.6),  # SGM block names, lora_te1_ / lora_te2_
]


def _latents(seed: int = 123) -> torch.Tensor:
    return torch.randn((1, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,layout,sampler,steps,guidance,scale", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_fused_lora_matches_diffusers(family, layout, sampler, steps, guidance, scale):
    root, modules, files, parts = saved(family)
    full, unet_only = files[layout]
    pipe = diffrt.Pipeline.from_pretrained(root)
    kw = {"height": H, "width": W, "guidance_scale": guidance, "output_type": "np"}
    before = pipe(PROMPT, steps=steps, sampler=sampler, latents=_latents(), **kw)
    pipe.load_lora(full, scale=scale)
    ours = pipe(PROMPT, steps=steps, sampler=sampler, latents=_latents(), generator=torch.Generator().manual_seed(7),
                **kw)  # fmt: skip
    text = {n: p for n, p in parts.items() if n != "unet"}
    ref_pipe = reference_with_lora(family, root, modules, sampler, unet_only, scale, text, RANK, ALPHAS["text_encoder"])
    with torch.no_grad():
        ref = ref_pipe(PROMPT, num_inference_steps=steps, latents=_latents(),
                       generator=torch.Generator().manual_seed(7), **kw).images  # fmt: skip
    check_images(ours, ref)
    assert np.abs(ours - before).max() > 1e-2, "the LoRA changed nothing"


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c, m in pipe.components.modules().items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_several_loras_then_unload_restores_every_weight_in_the_same_tensors(family):
    root, _, files, _ = saved(family)
    pipe = diffrt.Pipeline.from_pretrained(root)
    original = {k: v.clone() for k, v in _weights(pipe).items()}
    pointers = {k: v.data_ptr() for k, v in _weights(pipe).items()}
    kw = {"height": H, "width": W, "steps": 2, "sampler": "euler", "output_type": "np"}
    base = pipe(PROMPT, latents=_latents(), **kw)
    a = pipe.load_lora(files["diffusers"][0], scale=0.7, name="a")
    only_a = pipe(PROMPT, latents=_latents(), **kw)
    pipe.load_lora(files["kohya"][0], scale=-0.4, name="b")
    assert pipe.loras == {"a": 0.7, "b": -0.4}
    both = pipe(PROMPT, latents=_latents(), **kw)
    # diffusers' two-adapter fuse is W + 0.7 dA + (-0.4) dB; with the same pairs that is W + 0.3 dA (same pairs, both
    # layouts): the composition is exact to float32 rounding.
    pipe.unload_lora("b")
    pipe.set_lora_scale(a, 0.3)
    np.testing.assert_allclose(both, pipe(PROMPT, latents=_latents(), **kw), atol=1e-4)
    pipe.set_lora_scale(a, 0.7)
    np.testing.assert_array_equal(only_a, pipe(PROMPT, latents=_latents(), **kw))
    pipe.unload_lora()
    assert pipe.loras == {} and not pipe._loras.originals
    now = _weights(pipe)
    assert {k: v.data_ptr() for k, v in now.items()} == pointers, "a LoRA replaced a tensor instead of writing into it"
    changed = [k for k in original if not torch.equal(original[k], now[k])]
    assert not changed, f"unfused weights differ from the originals: {changed[:5]}"
    np.testing.assert_array_equal(base, pipe(PROMPT, latents=_latents(), **kw))


def test_a_lora_reaches_fused_projections_joined_before_it():
    """With attention's projections in one GEMM (ops.fuse_projections), a LoRA loaded after a first generation (which
    joined them) writes into the joint tensors: the images are the reference modules' with the same LoRA, and
    unloading gives the first image back."""
    from dataclasses import replace

    from diffrt.backends.eager import EagerBackend
    from diffrt.models.ops import TORCH_OPS

    root, _, files, _ = saved("sd1")
    plain = diffrt.Pipeline.from_pretrained(root)
    backend = EagerBackend("torch, fused projections", replace(TORCH_OPS, fuse_projections=True))
    fused = diffrt.Pipeline.from_pretrained(root, backend=backend)
    kw = {"height": H, "width": W, "steps": 2, "sampler": "euler", "output_type": "np"}
    base = fused(PROMPT, latents=_latents(), **kw)
    np.testing.assert_allclose(base, plain(PROMPT, latents=_latents(), **kw), atol=1e-5)
    for pipe in (plain, fused):
        pipe.load_lora(files["diffusers"][0], scale=0.7)
    with_lora = fused(PROMPT, latents=_latents(), **kw)
    np.testing.assert_allclose(with_lora, plain(PROMPT, latents=_latents(), **kw), atol=1e-5)
    assert np.abs(with_lora - base).max() > 1e-2, "the LoRA changed nothing"
    fused.unload_lora()
    np.testing.assert_allclose(fused(PROMPT, latents=_latents(), **kw), base, atol=1e-6)


def test_switching_loras_changes_the_next_image_and_the_prompt_embeddings():
    root, _, files, parts = saved("sd1")
    pipe = diffrt.Pipeline.from_pretrained(root)
    kw = {"height": H, "width": W, "steps": 2, "sampler": "euler", "output_type": "np", "latents": _latents()}
    base = pipe(PROMPT, **kw)
    embeds = pipe.encode_prompt([PROMPT])[0].clone()
    pipe.load_lora(files["kohya"][1], name="unet-only")  # no text-encoder layers: the cached embeddings still hold
    assert len(pipe.prompt_cache) > 0 and torch.equal(pipe.encode_prompt([PROMPT])[0], embeds)
    first = pipe(PROMPT, **kw)
    pipe.unload_lora()
    pipe.load_lora(files["diffusers"][0], name="with-text")
    assert len(pipe.prompt_cache) == 0  # the text encoder changed: no stale embeddings
    second = pipe(PROMPT, **kw)
    assert not torch.equal(pipe.encode_prompt([PROMPT])[0], embeds)
    assert np.abs(first - base).max() > 1e-2 and np.abs(second - first).max() > 1e-2


def test_switching_by_scales_equals_loading_only_that_lora():
    """Both loaded once; {"a": 0, "b": 1} gives the image of B alone, bit for bit, and back again."""
    root, _, files, _ = saved("sd1")
    pipe = diffrt.Pipeline.from_pretrained(root)
    kw = {"height": H, "width": W, "steps": 2, "sampler": "euler", "output_type": "np", "latents": _latents()}
    alone = {}
    for name, path in (("a", files["kohya"][1]), ("b", files["diffusers"][0])):
        pipe.load_lora(path, name=name)
        alone[name] = pipe(PROMPT, **kw)
        pipe.unload_lora()
    pipe.load_lora(files["kohya"][1], name="a")
    pipe.load_lora(files["diffusers"][0], name="b")
    both = pipe(PROMPT, **kw)
    for scales, expected in (({"a": 0.0, "b": 1.0}, "b"), ({"a": 1.0, "b": 0.0}, "a")):
        pipe.set_lora_scales(scales)
        assert pipe.loras == scales
        np.testing.assert_array_equal(pipe(PROMPT, **kw), alone[expected])
    assert np.abs(both - alone["a"]).max() > 1e-2 and np.abs(alone["a"] - alone["b"]).max() > 1e-2
    with pytest.raises(ValueError, match="no LoRA named 'c' is loaded; loaded: a, b"):
        pipe.set_lora_scales({"a": 1.0, "c": 1.0})
    assert pipe.loras == {"a": 1.0, "b": 0.0}  # a refused change changes nothing


def test_layouts_agree_with_each_other(tmp_path):
    """The same pairs written in each layout fuse to the same weights: the kohya names (diffusers' and LDM's, for SD1
    as A1111-era trainers wrote them, too) resolve to the same modules."""
    for family in ("sd1", "sdxl"):
        root, modules, files, parts = saved(family)
        paths = [files["diffusers"][0], files["kohya"][0]]
        if family == "sd1":  # LDM block names on an SD1 UNet (what kohya_unet_name writes for SDXL)
            paths.append(str(tmp_path / "ldm-names.safetensors"))
            save_kohya_layout(paths[-1], parts, "sdxl", dict(modules["unet"].config), ALPHAS)
        weights = []
        for path in paths:
            pipe = diffrt.Pipeline.from_pretrained(root)
            pipe.load_lora(path)
            weights.append(_weights(pipe))
        for other in weights[1:]:
            assert all(torch.equal(weights[0][k], other[k]) for k in weights[0]), family


def _write(path, tensors: dict) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return str(path)


def test_errors_name_the_family_keys_shapes_rank_and_alpha(tmp_path):
    sd1_root, _, sd1_files, _ = saved("sd1")
    _, _, xl_files, _ = saved("sdxl")
    pipe = diffrt.Pipeline.from_pretrained(sd1_root)
    with pytest.raises(
        CheckpointError, match=r"this LoRA is for SDXL \(it adapts a second text encoder.*the model is SD1"
    ):
        pipe.load_lora(xl_files["kohya"][0])
    sd = load_file(sd1_files["kohya"][0])
    down = next(k for k in sd if k.endswith("attn1_to_q.lora_down.weight"))
    stem = down.removesuffix(".lora_down.weight")
    wide = {f"{stem}.lora_down.weight": torch.zeros(4, 2048), f"{stem}.lora_up.weight": torch.zeros(32, 4)}
    wide[f"{stem.replace('attn1_to_q', 'attn2_to_k')}.lora_down.weight"] = torch.zeros(4, 2048)
    wide[f"{stem.replace('attn1_to_q', 'attn2_to_k')}.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(CheckpointError, match=r"this LoRA is for SDXL \(cross-attention width 2048"):
        pipe.load_lora(_write(tmp_path / "xl.safetensors", wide))
    bad = {**sd, "lora_unet_down_blocks_7_foo.lora_down.weight": torch.zeros(4, 8),
           "lora_unet_down_blocks_7_foo.lora_up.weight": torch.zeros(8, 4),
           f"{stem}.lora_down.weight": torch.zeros(4, 17)}  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        pipe.load_lora(_write(tmp_path / "bad.safetensors", bad))
    assert "1 LoRA key(s) match no layer of the model: lora_unet_down_blocks_7_foo.lora_down.weight" in str(e.value)
    assert "1 shape mismatch(es)" in str(e.value) and "attn1.to_q: LoRA up x down gives [32, 17]" in str(e.value)
    cases = {
        "rank mismatch": {f"{stem}.lora_up.weight": torch.zeros(32, 3)},
        r"alpha -1.0 of .* must be a finite number > 0 \(rank 4\)": {f"{stem}.alpha": torch.tensor(-1.0)},
        "has no matching": {f"{stem}.lora_up.weight": None},
        r"LoHa \(LyCORIS\)": {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)},
        "DoRA": {f"{stem}.dora_scale": torch.zeros(1, 32)},
    }
    for message, change in cases.items():
        tensors = {k: v for k, v in {**sd, **change}.items() if v is not None}
        with pytest.raises(CheckpointError, match=message):
            pipe.load_lora(_write(tmp_path / "case.safetensors", tensors))
    assert pipe.loras == {}  # nothing was fused by a failed load
    with pytest.raises(ValueError, match="no LoRA named 'x' is loaded"):
        pipe.load_lora(sd1_files["kohya"][0]) and pipe.unload_lora("x")
    with pytest.raises(ValueError, match="LoRA scale nan must be a finite number"):
        pipe.load_lora(sd1_files["kohya"][0], scale=float("nan"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_switching_under_a_captured_graph_takes_effect_on_the_next_replay():
    """A UNet step captured once; fusing, switching and unloading LoRAs write into the captured tensors, so each
    replay gives what an eager call on the new weights gives."""
    root, _, files, _ = saved("sd1")
    pipe = diffrt.Pipeline.from_pretrained(root, device="cuda", dtype=torch.float16)
    unet = pipe.components.unet
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, 77, 64, device="cuda", dtype=torch.float16)
    t = torch.tensor(500.0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        unet(x, t, ctx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = unet(x, t, ctx)
    outputs = []
    for step in ("none", "a", "b", "unload"):
        if step == "a":
            pipe.load_lora(files["diffusers"][0], name="a")
        elif step == "b":
            pipe.unload_lora("a")
            pipe.load_lora(files["kohya"][0], scale=-0.5, name="b")
        elif step == "unload":
            pipe.unload_lora()
        graph.replay()
        with torch.inference_mode():
            torch.testing.assert_close(out, unet(x, t, ctx), rtol=1e-3, atol=1e-3)
        outputs.append(out.clone())
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    torch.testing.assert_close(outputs[3], outputs[0], rtol=0, atol=0)
