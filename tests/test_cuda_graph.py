"""The cuda-graph backend: whole generations replayed from CUDA graphs give the eager pipeline's images.

GPU tests (`-m gpu`, on the device): per bucket, the replayed generation matches the same kernels run eagerly (the
noise order and every per-call input reach the graph), and fp16 stays within twice torch fp16's own error of the
fp32 reference (max abs error in 0..1, PSNR reported), never NaN, at every size and batch checked.
"""

import math

import numpy as np
import pytest
import torch

from diffrt.backends import default_backend, make_backend
from diffrt.backends.cuda_graph import CudaGraphBackend
from diffrt.backends.eager import EagerBackend
from diffrt.models.ops import TRITON_OPS
from diffrt.pipeline import Pipeline

PROMPT = "a photo of an astronaut riding a horse"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def test_cpu_pipelines_get_the_eager_reference_and_the_graph_backend_says_why_not():
    assert default_backend("cpu") == "torch"
    with pytest.raises(ValueError, match="the cuda-graph backend runs on a CUDA device, not cpu; use backend='torch'"):
        Pipeline.from_pretrained("tiny-sd15", backend="cuda-graph")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def pipes():
    """The same random tiny weights three ways: fp32 torch (the reference), fp16 torch, fp16 graphs; and the graphs'
    own kernels run eagerly (channels-last, Triton), which the replays must reproduce."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device machine)")
    out = {}
    for preset in ("tiny-sd15", "tiny-sdxl"):
        out[preset] = {
            "fp32": Pipeline.from_pretrained(preset, device="cuda", dtype=torch.float32, backend="torch"),
            "fp16": Pipeline.from_pretrained(preset, device="cuda", dtype=torch.float16, backend="torch"),
            "graph": Pipeline.from_pretrained(preset, device="cuda", dtype=torch.float16, backend="cuda-graph"),
            "eager-kernels": Pipeline.from_pretrained(
                preset, device="cuda", dtype=torch.float16, backend=EagerBackend("triton", TRITON_OPS)
            ),  # fmt: skip
        }
        for module in out[preset]["eager-kernels"].components.modules().values():
            module.to(memory_format=torch.channels_last)
    return out


CASES = [  # (sampler, steps, guidance, batch, height, width)
    ("turbo", 1, 0.0, 1, 64, 64),
    ("lcm", 4, 1.0, 2, 128, 96),
    ("euler", 3, 5.0, 1, 96, 160),
    ("euler_a", 2, 7.5, 2, 256, 256),
    ("dpmpp_2m", 3, 3.0, 1, 320, 192),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}x{c[3]}-{c[4]}x{c[5]}" for c in CASES])
def test_replayed_generations_match_eager_and_the_fp32_reference(pipes, preset, case):
    sampler, steps, guidance, batch, height, width = case
    p = pipes[preset]
    kw = {"steps": steps, "sampler": sampler, "guidance_scale": guidance, "batch": batch, "height": height,
          "width": width, "output_type": "np", "seed": 3}  # fmt: skip
    graph = [p["graph"](PROMPT, **kw) for _ in range(2)]  # the first call captures, the second replays
    np.testing.assert_array_equal(graph[0], graph[1])
    eager = p["eager-kernels"](PROMPT, **kw)
    assert np.abs(graph[1] - eager).max() <= 2e-3, "the replay is not the eager run of the same kernels"
    reference, fp16 = p["fp32"](PROMPT, **kw), p["fp16"](PROMPT, **kw)
    ours, torchs = np.abs(graph[1] - reference).max(), np.abs(fp16 - reference).max()
    assert np.isfinite(graph[1]).all()
    assert ours <= max(2 * torchs, 4e-3), f"graphs {ours:.2e} vs torch fp16 {torchs:.2e}"
    print(f"{preset} {case}: max abs {ours:.2e}, PSNR {psnr(graph[1], reference):.1f} dB (torch fp16 {torchs:.2e})")


@pytest.mark.gpu
@gpu
def test_buckets_are_reused_bounded_and_reported(pipes):
    backend = CudaGraphBackend(max_buckets=2)
    pipe = Pipeline.from_pretrained("tiny-sd15", device="cuda", dtype=torch.float16, backend=backend)
    kw = {"steps": 2, "sampler": "euler", "output_type": "pt", "seed": 1}
    pipe(PROMPT, height=64, width=64, guidance_scale=3.0, **kw)
    changed = pipe(PROMPT, height=64, width=64, guidance_scale=6.0, **kw)  # another scale: the same graph
    assert len(backend.buckets()) == 1 and backend.buckets()[0]["replays"] == 2
    eager = pipes["tiny-sd15"]["eager-kernels"](PROMPT, height=64, width=64, guidance_scale=6.0, **kw)
    assert (changed.float() - eager.float()).abs().max() <= 2e-3  # the new scale reached the graph
    pipe(PROMPT, height=128, width=64, guidance_scale=3.0, **kw)
    pipe(PROMPT, height=64, width=128, guidance_scale=3.0, **kw)
    rows = backend.buckets()
    assert [r["latents"] for r in rows] == [(1, 4, 16, 8), (1, 4, 8, 16)]  # the oldest bucket was evicted
    assert all(r["pool_bytes"] >= 0 and r["static_bytes"] > 0 for r in rows)


@pytest.mark.gpu
@gpu
def test_two_graph_pipelines_interleave_on_one_device(pipes):
    a = pipes["tiny-sd15"]["graph"]
    b = Pipeline.from_pretrained("tiny-sdxl", device="cuda", dtype=torch.float16, backend=make_backend("cuda-graph"))
    kw = {"steps": 2, "sampler": "lcm", "output_type": "np", "seed": 9}
    first = (a(PROMPT, **kw), b(PROMPT, **kw))
    for _ in range(3):
        np.testing.assert_array_equal(a(PROMPT, **kw), first[0])
        np.testing.assert_array_equal(b(PROMPT, **kw), first[1])


def test_bench_says_what_it_needs(capsys):
    from diffrt.cli import main

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")
    assert main(["bench", "--sizes", "512"]) == 2
    assert "needs a CUDA GPU; this machine has none" in capsys.readouterr().err
    assert main(["bench", "--runs", "2 steps"]) == 2
    assert "unknown run(s) ['2 steps']; choose from: 1 step, LCM 4 steps, 25 steps CFG" in capsys.readouterr().err
    assert main(["bench", "--sizes", "512,wide"]) == 2
    assert "size 'wide' is neither a side (512) nor HEIGHTxWIDTH (768x1344)" in capsys.readouterr().err


@pytest.mark.gpu
@gpu
def test_bench_prints_the_table_for_the_embedded_model(capsys, tmp_path):
    from diffrt.cli import main

    argv = ["bench", "--sizes", "64,64x96", "--runs", "1 step,LCM 4 steps", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for what in ("text_encoder", "unet_step", "decode", "end to end, 1 step", "end to end, LCM 4 steps", "64x96"):
        assert what in out, out
    rows = __import__("json").loads((tmp_path / "b.json").read_text())
    assert len(rows) == 2 * 5 and {(r["height"], r["width"]) for r in rows} == {(64, 64), (64, 96)}
    assert all(r["image_finite"] and r["image_min_std"] > 0 for r in rows if r["what"].startswith("end to end"))


@pytest.mark.gpu
@gpu
def test_a_replayed_generation_waits_for_nothing(pipes):
    """Once a bucket is captured, a call (text encoder included) issues no synchronizing CUDA call."""
    pipe = pipes["tiny-sdxl"]["graph"]
    kw = {"steps": 2, "sampler": "lcm", "output_type": "pt", "seed": 4, "height": 64, "width": 64}
    pipe(PROMPT, **kw)
    pipe.prompt_cache.clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pipe(PROMPT, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_the_texts_keys_and_values_are_projected_inside_the_graph(preset):
    """With every cross-attention's keys and values projected once per generation (ops.joint_cross_attention, on in
    TRITON_OPS; the test names it so that it holds if the fast path changes), the
    projection is recorded in the generation's graph: a second prompt through the same bucket gives that prompt's
    image (the eager run of the same kernels), not the first prompt's keys and values; CFG's doubled batch too."""
    from dataclasses import replace

    joint = replace(TRITON_OPS, name="triton+joint-cross-attention", joint_cross_attention=True)
    graph = Pipeline.from_pretrained(preset, device="cuda", dtype=torch.float16, backend=CudaGraphBackend(joint))
    eager = Pipeline.from_pretrained(preset, device="cuda", dtype=torch.float16, backend=EagerBackend("j", joint))
    for module in eager.components.modules().values():
        module.to(memory_format=torch.channels_last)
    for kw in ({"steps": 4, "sampler": "lcm", "guidance_scale": 1.0}, {"steps": 3, "sampler": "euler",
                                                                        "guidance_scale": 5.0}):  # fmt: skip
        kw = {**kw, "height": 64, "width": 96, "seed": 5, "output_type": "np"}
        first, second = graph(PROMPT, **kw), graph("a watercolour of a lighthouse at dusk", **kw)
        assert len(graph.backend.buckets()) >= 1 and graph.backend.buckets()[-1]["replays"] == 2
        np.testing.assert_array_equal(graph(PROMPT, **kw), first)
        assert np.abs(second - eager("a watercolour of a lighthouse at dusk", **kw)).max() <= 2e-3
        # else the eager comparison above could not tell the second prompt's keys and values from the first's
        assert np.abs(first - second).max() > 2e-3, "the prompt did not change the image beyond the tolerance"
