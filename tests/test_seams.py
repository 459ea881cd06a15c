"""The runtime's seams: backends as objects owned by pipelines, the pipeline talking to role interfaces only, the
request resolved and checked once, the seed reported, and the caches safe under threads."""

import dataclasses
import threading

import numpy as np
import pytest
import torch

from diffrt.backends.eager import EagerBackend
from diffrt.models.ops import TRITON_OPS, Ops, ops_of
from diffrt.pipeline import Pipeline
from diffrt.request import GenerationRequest
from diffrt.roles import Roles

PROMPT = "a red circle"
CALL = {"steps": 2, "sampler": "euler_a", "seed": 5, "output_type": "np"}  # euler_a: fresh noise every step
# Triton's interpreter takes a fraction of a second per kernel launch on a CPU: the two-backend test keeps it small.
SMALL = {**CALL, "height": 16, "width": 16}


@pytest.fixture
def one_intra_op_thread():
    """Two Python threads share torch's intra-op pool; one thread each keeps every reduction order fixed, so that
    outputs can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spy(ops: Ops, calls: list) -> Ops:
    """`ops` with every call of each op recorded as (op, thread)."""

    def recorded(name: str):
        def call(*args, **kwargs):
            calls.append((name, threading.get_ident()))
            return getattr(ops, name)(*args, **kwargs)

        return call

    ops_fields = [f.name for f in dataclasses.fields(Ops) if callable(getattr(ops, f.name))]
    return dataclasses.replace(ops, name=f"spy-{ops.name}", **{f: recorded(f) for f in ops_fields})


def test_two_backends_in_one_process_from_two_threads(one_intra_op_thread):
    pytest.importorskip("triton")
    calls = []
    reference = Pipeline.from_pretrained("tiny-sd15", backend="torch")
    kernels = Pipeline.from_pretrained("tiny-sd15", backend=EagerBackend("triton-spy", spy(TRITON_OPS, calls)))
    assert ops_of(reference.components.unet) == {"torch"} and ops_of(kernels.components.unet) == {"spy-triton"}
    alone = {"torch": reference(PROMPT, **SMALL), "triton": kernels(PROMPT, **SMALL)}
    assert calls, "the kernel pipeline's ops were never called"
    difference = np.abs(alone["torch"] - alone["triton"]).max()
    assert 0 < difference < 1e-3, f"kernels vs torch differ by {difference:.2e}: not the kernels, or not close"

    calls.clear()
    barrier, results, threads = threading.Barrier(2), {"torch": [], "triton": []}, {}

    def work(name: str, pipe: Pipeline) -> None:
        threads[name] = threading.get_ident()
        for _ in range(2):
            barrier.wait(300)  # each round both pipelines start at once
            results[name].append(pipe(PROMPT, **SMALL))

    workers = [threading.Thread(target=work, args=item) for item in (("torch", reference), ("triton", kernels))]
    for t in workers:
        t.start()
    for t in workers:
        t.join(600)
    for name, images in results.items():
        assert len(images) == 2
        for image in images:
            np.testing.assert_array_equal(image, alone[name], err_msg=f"{name} changed when run beside the other")
    assert {thread for _, thread in calls} == {threads["triton"]}, "a kernel ran for the torch pipeline"


def test_a_plain_function_stands_in_for_the_unet():
    """The pipeline needs the denoiser role only: a plain callable over the module gives the module's image."""
    pipe = Pipeline.from_pretrained("tiny-sd15")
    unet = pipe.components.unet
    seen = []

    def denoiser(latents, timestep, cond):
        seen.append((tuple(latents.shape), tuple(cond.embeds.shape)))
        return unet(latents, timestep, cond.embeds)

    roles = Roles(pipe.roles.text_encoder, denoiser, pipe.roles.codec)
    bare = Pipeline(pipe.spec, pipe.tokenizers, roles, pipe.backend, pipe.device, pipe.dtype)  # no modules
    kw = {**CALL, "guidance_scale": 3.0, "negative_prompt": "blurry"}
    np.testing.assert_array_equal(bare(PROMPT, **kw), pipe(PROMPT, **kw))
    assert seen == [((2, 4, 8, 8), (2, 77, 32))] * 2  # two steps, conditional and unconditional in one batch

    zeros = Roles(pipe.roles.text_encoder, lambda x, t, c: torch.zeros_like(x), pipe.roles.codec)
    blank = Pipeline(pipe.spec, pipe.tokenizers, zeros, pipe.backend, pipe.device, pipe.dtype)
    assert np.abs(blank(PROMPT, **kw) - pipe(PROMPT, **kw)).max() > 1e-2, "the stand-in was not used"


def test_result_reports_the_seed_and_it_reproduces_the_image():
    pipe = Pipeline.from_pretrained("tiny-sd15")
    request = GenerationRequest(PROMPT, steps=2, sampler="euler_a", output_type="np")
    first = pipe.generate(request)
    assert isinstance(first.seed, int)
    again = pipe.generate(GenerationRequest(PROMPT, steps=2, sampler="euler_a", output_type="np", seed=first.seed))
    np.testing.assert_array_equal(first.images, again.images)
    assert again.seed == first.seed and first.latents.shape == (1, 4, 8, 8)
    other = pipe.generate(request)
    assert other.seed != first.seed and np.abs(other.images - first.images).max() > 1e-3
    assert pipe.generate(request, generator=torch.Generator().manual_seed(1)).seed is None  # the caller's generator


def test_prompt_cache_is_safe_under_concurrent_calls():
    pipe = Pipeline.from_pretrained("tiny-sd15")
    pipe.prompt_cache.size = 3  # small, so that threads evict each other's entries all the time
    prompts = [f"prompt number {i}" for i in range(8)]
    expected = {p: pipe.roles.text_encoder(pipe.tokenizers[0]([p]), None)[0] for p in prompts}
    errors, barrier = [], threading.Barrier(4)

    def work(offset: int) -> None:
        barrier.wait(30)
        try:
            for i in range(40):
                p = prompts[(i + offset) % len(prompts)]
                embeds, _ = pipe.encode_prompt([p])
                torch.testing.assert_close(embeds, expected[p], rtol=0, atol=0)
        except Exception as e:  # reported below: an assertion in a thread would otherwise vanish
            errors.append(e)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not errors, errors[0]
    assert len(pipe.prompt_cache) <= 3


def test_the_vae_runs_in_the_dtype_asked_for():
    """vae_dtype sets the VAE's own dtype (bf16 for the SDXL VAE, whose fp16 overflows), the rest keeps the
    pipeline's; the image stays close to the default's."""
    default = Pipeline.from_pretrained("tiny-sdxl")
    bf16 = Pipeline.from_pretrained("tiny-sdxl", vae_dtype=torch.bfloat16)
    assert next(bf16.components.vae.parameters()).dtype == torch.bfloat16
    assert next(bf16.components.unet.parameters()).dtype == torch.float32
    kw = {"steps": 2, "seed": 3, "height": 64, "width": 64, "output_type": "pt"}
    ours, reference = bf16("a red circle", **kw), default("a red circle", **kw)
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert 0 < (ours.float() - reference).abs().max() < 0.05  # bf16 rounding, not another image


def test_the_sdxl_vae_leaves_fp16_for_a_wider_exponent():
    """Only a VAE that overflows in fp16 leaves the pipeline's dtype: fp32 off a GPU (diffusers' upcast), bf16 on one
    that has it (its error and time: benchmarks/results/vae_precision_h200.json)."""
    from diffrt.assembly import open_model
    from diffrt.pipeline import default_vae_dtype

    sdxl, sd15 = open_model("tiny-sdxl").spec, open_model("tiny-sd15").spec
    cpu = torch.device("cpu")
    assert sdxl.memory.vae_upcast and not sd15.memory.vae_upcast
    assert default_vae_dtype(sdxl, cpu, torch.float16) == torch.float32
    assert default_vae_dtype(sdxl, cpu, torch.float32) == torch.float32
    assert default_vae_dtype(sd15, cpu, torch.float16) == torch.float16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert default_vae_dtype(sdxl, torch.device("cuda"), torch.float16) == torch.bfloat16


def test_a_prompt_that_is_no_string_gets_a_clear_error():
    pipe = Pipeline.from_pretrained("tiny-sd15")
    for bad in (5, None, ["a", 3], b"bytes"):
        with pytest.raises(ValueError, match="prompt must be a string or a non-empty list of strings"):
            pipe.generate(GenerationRequest(prompt=bad, **CALL))
    assert pipe.generate(GenerationRequest(prompt=("a", "b"), **CALL)).images.shape[0] == 2  # a tuple is a list
