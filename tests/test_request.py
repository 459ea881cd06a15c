"""A request is resolved and checked once, before any work: each mistake named once with what is allowed, the
CLI refusing before it loads the model, and sizes that cannot fit refused from a memory estimate."""

import re

import pytest
import torch

from diffrt.assembly import ModelSource, open_model
from diffrt.cli import main
from diffrt.cli_generate import DEFAULT_MODEL
from diffrt.memory import available_bytes
from diffrt.request import GenerationRequest, resolve_request

CPU = torch.device("cpu")


def resolve(spec, **fields):
    return resolve_request(GenerationRequest("a red circle", **fields), spec, device=CPU, dtype=torch.float32,
                           weights_resident=False)  # fmt: skip


@pytest.fixture(scope="module")
def default_spec():
    return open_model(DEFAULT_MODEL).spec


def test_defaults_come_from_the_model(default_spec):
    r = resolve(default_spec)
    assert (r.sampler, r.steps, r.guidance_scale, r.height, r.width) == ("lcm", 4, 8.5, 64, 64)
    sdxl = open_model("tiny-sdxl").spec
    r = resolve(sdxl, sampler="ddim")
    assert (r.steps, r.guidance_scale) == (25, 5.0) and r.eta is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"guidance_scale": float("nan")}, "guidance scale nan must be a finite number >= 0"),
        ({"guidance_scale": float("inf")}, "guidance scale inf must be a finite number >= 0"),
        ({"guidance_scale": -1.0}, "guidance scale -1.0 must be a finite number >= 0"),
        ({"steps": 0}, "steps 0 must be an integer >= 1"),
        ({"steps": 2000, "sampler": "euler"}, r"steps 2000 must be an integer in \[1, 1000\]"),
        ({"steps": 60}, "steps 60 exceeds original_inference_steps 50"),
        ({"sampler": "plms"}, "unknown sampler 'plms'; choose one of: lcm, tcd"),
        ({"height": 500}, "height 500 is not a multiple of 8; try 496 or 504"),
        ({"batch": 0}, "batch 0 must be an integer >= 1"),
        ({"clip_skip": 9}, r"clip_skip 9 is out of range; this text encoder allows 0..\d"),
        ({"seed": -3}, r"seed -3 must be an integer in \[0, 2\*\*63\)"),
        ({"output_type": "jpeg"}, "output_type 'jpeg'; choose one of: pil, np, pt"),
        ({"original_size": (512, 512)}, "micro-conditioning applies to SDXL models only"),
        ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
        ({"latents": torch.zeros(1, 4, 9, 8)}, r"latents have shape \(1, 4, 9, 8\); this call needs \(1, 4, 8, 8\)"),
        (
            {"image": torch.zeros(1, 3, 32, 32), "height": 64},
            r"init image tensor is \(32, 32\) \(H, W\) but the output is \(64, 32\)",
        ),
    ],
)
def test_each_mistake_is_named(default_spec, fields, message):
    with pytest.raises(ValueError, match=message):
        resolve(default_spec, **fields)


def test_several_mistakes_in_one_message_each_named_once(default_spec):
    with pytest.raises(ValueError) as e:
        resolve(default_spec, width=500, steps=0, guidance_scale=float("nan"))
    text = str(e.value)
    for part in ("width 500 is not a multiple of 8", "steps 0 must be", "guidance scale nan"):
        assert text.count(part) == 1, text


def test_a_size_that_cannot_fit_is_refused_with_the_largest_that_does(default_spec):
    available = available_bytes(CPU)
    if available is None:
        pytest.skip("this OS does not say how much memory is available")
    with pytest.raises(ValueError, match=r"65536x65536 x 1 image\(s\) needs about .* GiB on cpu") as e:
        resolve(default_spec, height=65536, width=65536)
    w, h = map(int, re.search(r"the largest 1:1 size that fits is (\d+)x(\d+)", str(e.value)).groups())
    assert w == h and w % 8 == 0 and 64 <= w < 65536
    assert resolve(default_spec, height=h, width=w).height == h  # the size it names does pass
    with pytest.raises(ValueError, match="needs about"):
        resolve(default_spec, height=h + 8 * 64, width=w + 8 * 64)
    resolve(default_spec, height=65536, width=65536, check_memory=False)  # the override (nothing runs here)


def test_the_pipeline_refuses_before_any_work(monkeypatch):
    import diffrt

    pipe = diffrt.Pipeline.from_pretrained("tiny-sd15")
    monkeypatch.setattr(pipe.backend, "run", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded"))
    for bad in ({"guidance_scale": float("nan")}, {"width": 65536, "height": 65536}, {"sampler": "euler", "eta": 1}):
        with pytest.raises(ValueError):
            pipe("x", **bad)


BAD = [  # CLI arguments, the words of the one message
    (["--cfg", "nan"], "guidance scale nan must be a finite number >= 0"),
    (["--cfg", "-2"], "guidance scale -2.0 must be a finite number >= 0"),
    (["-W", "65536", "-H", "65536"], "the largest 1:1 size that fits is"),
    (
        ["-W", "500", "--steps", "0"],
        "2 problems with this request:\n  - steps 0 must be an integer >= 1\n  - width 500",
    ),
    (["--eta", "0.5"], "eta applies to the ddim and tcd samplers only, not 'lcm'"),
]


@pytest.mark.parametrize("extra, words", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_cli_refuses_once_before_loading(tmp_path, capsys, monkeypatch, extra, words):
    if extra[0] == "-W" and available_bytes(CPU) is None:
        pytest.skip("this OS does not say how much memory is available")
    monkeypatch.setattr(ModelSource, "components", lambda self: pytest.fail("the model was loaded"))
    assert main(["generate", "-p", "a red circle", *extra, "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert err.count("error:") == 1 and all(line.startswith(("diffrt generate: error:", "  - ")) for line in
                                            err.strip().splitlines()), err  # fmt: skip
    assert list(tmp_path.iterdir()) == []
