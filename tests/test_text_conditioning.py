"""Prompt -> UNet conditioning: ours (diffrt tokenizer + text encoders) against diffusers' own encode_prompt.

diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline(+Img2Img for the refiner) are built around the
transformers text encoders and transformers tokenizers (no UNet, no VAE: encode_prompt does not touch them), and
their `encode_prompt` is called as it is. Ours load the same saved weights and the same vocabulary folders.
"""

import types
import warnings

import pytest
import torch

from diffrt.backends.torch_roles import TorchTextEncoder
from diffrt.models.clip import PRESETS
from diffrt.models.text_conditioning import PromptEncoder
from diffrt.tokenizer import CLIPTokenizer
from tests.helpers.clip_models import load_ours, save_reference
from tests.helpers.clip_vocab import EOS, build_clip_vocab
from tests.helpers.parity import assert_parity

PROMPTS = [
    ["a photo of an astronaut riding a horse on mars"],
    ["masterpiece, best quality, Zürich at night, 東京 🌸", "an extremely long prompt " + "cat dog " * 60],
]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Saved tiny text encoders and vocab folders, and both sides' tokenizer/encoder objects."""
    from transformers import CLIPTokenizer as ReferenceTokenizer

    root = tmp_path_factory.mktemp("conditioning")
    out = {}
    for name, pad in (("tiny-clip-l", EOS), ("tiny-openclip-h", "!"), ("tiny-openclip-bigg", "!")):
        vocab = build_clip_vocab(root / name / "tokenizer", pad_token=pad)
        reference = save_reference(PRESETS[name], root / name / "text_encoder", seed=len(out))
        if not hasattr(reference, "text_model"):
            # diffusers 0.42's clip_skip path calls text_encoder.text_model.final_layer_norm, a module transformers 5
            # moved to text_encoder.final_layer_norm; point the old name at the same LayerNorm (no new weights).
            reference.text_model = types.SimpleNamespace(final_layer_norm=reference.final_layer_norm)
        out[name] = {
            "reference": reference,
            "reference_tokenizer": ReferenceTokenizer.from_pretrained(str(vocab)),
            "ours": load_ours(root / name / "text_encoder"),
            "tokenizer": CLIPTokenizer.from_pretrained(vocab),
        }
    return out


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(steps_offset=1)


def _quiet():
    from diffusers.utils import logging

    logging.set_verbosity_error()  # diffusers logs the truncation of the long prompt; ours warns (checked below)
    warnings.simplefilter("ignore")


@pytest.mark.parametrize("prompt", PROMPTS, ids=["batch1", "batch2"])
@pytest.mark.parametrize("clip_skip", [None, 1, 2])
@pytest.mark.parametrize("encoder", ["tiny-clip-l", "tiny-openclip-h"])
def test_sd_matches_diffusers(parts, encoder, clip_skip, prompt):
    from diffusers import StableDiffusionPipeline

    p = parts[encoder]
    pipe = StableDiffusionPipeline(vae=None, text_encoder=p["reference"], tokenizer=p["reference_tokenizer"],
                                   unet=None, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    with warnings.catch_warnings(), torch.no_grad():
        _quiet()
        expected, _ = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=clip_skip)
        embeds, pooled = encode_prompt(prompt, p["tokenizer"], p["ours"], clip_skip=clip_skip)
    assert pooled is None
    assert_parity(embeds, expected, what=f"prompt_embeds (clip_skip={clip_skip})")


@pytest.mark.parametrize("prompt", PROMPTS, ids=["batch1", "batch2"])
@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("prompt_2", [None, "a different second prompt"])
def test_sdxl_matches_diffusers(parts, clip_skip, prompt, prompt_2):
    from diffusers import StableDiffusionXLPipeline

    p1, p2 = parts["tiny-clip-l"], parts["tiny-openclip-bigg"]
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=p1["reference"], text_encoder_2=p2["reference"],
                                     tokenizer=p1["reference_tokenizer"], tokenizer_2=p2["reference_tokenizer"],
                                     unet=None, scheduler=_scheduler())  # fmt: skip
    prompt_2 = None if prompt_2 is None else [prompt_2] * len(prompt)
    with warnings.catch_warnings(), torch.no_grad():
        _quiet()
        expected, _, expected_pooled, _ = pipe.encode_prompt(
            prompt, prompt_2, "cpu", 1, do_classifier_free_guidance=False, clip_skip=clip_skip
        )
        embeds, pooled = encode_prompt(prompt, p1["tokenizer"], p1["ours"], p2["tokenizer"], p2["ours"],
                                       prompt_2=prompt_2, clip_skip=clip_skip)  # fmt: skip
    widths = PRESETS["tiny-clip-l"].hidden_size + PRESETS["tiny-openclip-bigg"].hidden_size
    assert embeds.shape == (len(prompt), 77, widths)
    assert_parity(embeds, expected, what="prompt_embeds")
    assert_parity(pooled, expected_pooled, what="pooled (text_embeds)")


def test_sdxl_refiner_matches_diffusers(parts):
    """The refiner conditions on text_encoder_2 alone."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    p2 = parts["tiny-openclip-bigg"]
    pipe = StableDiffusionXLImg2ImgPipeline(vae=None, text_encoder=None, text_encoder_2=p2["reference"],
                                            tokenizer=None, tokenizer_2=p2["reference_tokenizer"], unet=None,
                                            scheduler=_scheduler(), requires_aesthetics_score=True)  # fmt: skip
    prompt = PROMPTS[1]
    with warnings.catch_warnings(), torch.no_grad():
        _quiet()
        expected, _, expected_pooled, _ = pipe.encode_prompt(prompt, None, "cpu", 1, False)
        embeds, pooled = encode_prompt(prompt, None, None, p2["tokenizer"], p2["ours"])
    assert_parity(embeds, expected, what="prompt_embeds")
    assert_parity(pooled, expected_pooled, what="pooled")


def test_truncation_warns_and_bad_arguments(parts):
    p1, p2 = parts["tiny-clip-l"], parts["tiny-openclip-bigg"]
    with pytest.warns(UserWarning, match="tokens were dropped"):
        encode_prompt(PROMPTS[1], p1["tokenizer"], p1["ours"])
    with pytest.raises(ValueError, match="clip_skip 12 is out of range; this text encoder allows 0..3"):
        PromptEncoder(p1["ours"], clip_skip=12)
    with pytest.raises(ValueError, match="allows 0..2"):  # SDXL counts from the penultimate layer of the shallower
        PromptEncoder(p1["ours"], p2["ours"], clip_skip=3)
    with pytest.raises(ValueError, match="must have a text_projection"):
        PromptEncoder(p1["ours"], p1["ours"])


def encode_prompt(
    prompt, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None, prompt_2=None, clip_skip=None
):
    """Ours as the pipeline runs it: its tokenizers, then the torch text-encoder role (which takes each encoder's
    ids apart, so a second prompt for the second encoder goes through as diffusers' prompt_2 does)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    ids = tokenizer(prompts) if tokenizer is not None else None
    ids_2 = tokenizer_2(prompt_2 or prompts) if tokenizer_2 is not None else None
    with torch.inference_mode():
        return TorchTextEncoder(text_encoder, text_encoder_2)(ids, ids_2, clip_skip)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sdxl_encoders_side_by_side_give_the_same_embeddings(dtype):
    """ops.concurrent_text_encoders: SDXL's first encoder on a side stream while the second runs gives the sequential
    run's embeddings bit for bit, eagerly and replayed from a CUDA graph with new ids each time."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import dataclasses

    import diffrt
    from diffrt.backends.graphs import CapturedCall
    from diffrt.models.ops import TRITON_OPS, set_ops

    pipe = diffrt.Pipeline.from_pretrained("tiny-sdxl", device="cuda", dtype=dtype, backend="torch")
    one, two = pipe.components.text_encoder, pipe.components.text_encoder_2
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, one.config.vocab_size - 1, (2, 77), generator=g).cuda() for _ in range(3)]
    sequential = dataclasses.replace(TRITON_OPS, concurrent_text_encoders=False)
    side_by_side = dataclasses.replace(TRITON_OPS, concurrent_text_encoders=True)  # as TRITON_OPS has it

    def encode(ops, batch):
        for encoder in (one, two):
            set_ops(encoder, ops)
        with torch.inference_mode():
            return PromptEncoder(one, two)(batch, batch)

    expected = [encode(sequential, batch) for batch in ids]
    for batch, (embeds, pooled) in zip(ids, expected, strict=True):
        got = encode(side_by_side, batch)
        assert torch.equal(got[0], embeds) and torch.equal(got[1], pooled)
    static = ids[0].clone()
    with torch.inference_mode():
        call = CapturedCall(lambda: encode(side_by_side, static), torch.device("cuda"))
        for batch, (embeds, pooled) in zip(ids, expected, strict=True):
            static.copy_(batch)
            got = call.replay()
            assert torch.equal(got[0], embeds) and torch.equal(got[1], pooled)


def test_sdxl_encoders_side_by_side_on_the_cpu_run_one_after_the_other():
    import dataclasses

    import diffrt
    from diffrt.models.ops import TORCH_OPS, set_ops

    pipe = diffrt.Pipeline.from_pretrained("tiny-sdxl")
    one, two = pipe.components.text_encoder, pipe.components.text_encoder_2
    ids = torch.randint(0, one.config.vocab_size - 1, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = PromptEncoder(one, two)(ids, ids)
        for encoder in (one, two):
            set_ops(encoder, dataclasses.replace(TORCH_OPS, concurrent_text_encoders=True))
        got = PromptEncoder(one, two)(ids, ids)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize(("preset", "clip_skip", "first_layers"), [("tiny-sd15", 1, 2), ("tiny-sdxl", None, 2)],
                         ids=["sd-clip-skip-1", "sdxl"])  # fmt: skip
def test_the_first_encoder_runs_only_the_layers_its_conditioning_reads(preset, clip_skip, first_layers):
    """tiny CLIP-L has 3 layers: clip_skip 1 reads the output of layer 2; SDXL the penultimate (2) and no pooled
    output of its first encoder. The layers after those are not run; the second encoder (SDXL's pooled) runs all."""
    import diffrt

    pipe = diffrt.Pipeline.from_pretrained(preset)
    one, two = pipe.components.text_encoder, pipe.components.text_encoder_2
    ran = []
    for encoder in (one, two):
        for layer in encoder.text_model.encoder.layers if encoder is not None else ():
            layer.register_forward_hook(lambda module, *_: ran.append(module))
    ids = torch.randint(0, one.config.vocab_size - 1, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        PromptEncoder(one, two, clip_skip)(ids, ids if two is not None else None)
    assert ran[:first_layers] == list(one.text_model.encoder.layers[:first_layers])
    assert ran[first_layers:] == (list(two.text_model.encoder.layers) if two is not None else [])
