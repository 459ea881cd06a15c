"""diffrt.Stream on a GPU (`-m gpu`, on the device): each frame replayed from one CUDA graph gives the eager run of
the same kernels (within one 8-bit level) and stays within twice torch fp16's own error of the fp32 reference, never
NaN; a prompt or strength change reaches the graph without a new capture."""

import numpy as np
import pytest
import torch

import diffrt
from diffrt.backends.eager import EagerBackend
from diffrt.models.ops import TRITON_OPS
from tests.helpers.stream_fixtures import frames

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
OPTIONS = {"prompt": "a photo of a cat", "height": 128, "width": 96, "steps": (10, 25, 40), "seed": 5}


@pytest.fixture(scope="module")
def pipes():
    """tiny-sd15's random weights four ways: fp32 and fp16 torch (the references), fp16 on the cuda-graph backend,
    and fp16 on the graph backend's kernels (Triton, channels-last) run eagerly."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device machine)")

    def make(dtype: torch.dtype, backend) -> diffrt.Pipeline:
        return diffrt.Pipeline.from_pretrained("tiny-sd15", device="cuda", dtype=dtype, backend=backend)

    out = {
        "fp32": make(torch.float32, "torch"),
        "fp16": make(torch.float16, "torch"),
        "graph": make(torch.float16, "cuda-graph"),
        "kernels": make(torch.float16, EagerBackend("triton", TRITON_OPS)),
    }
    for module in out["kernels"].components.modules().values():
        module.to(memory_format=torch.channels_last)
    return out


def pictures(stream: diffrt.Stream, inputs) -> list[np.ndarray]:
    reports = [r for f in inputs for r in stream(f)] + stream.flush()
    assert [r.index for r in reports] == list(range(len(inputs)))
    return [r.picture.astype(np.float64) / 255 for r in reports]


def _levels(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a - b) * 255
    return f"max {d.max():.0f}, mean {d.mean():.4f}, share differing {np.mean(d > 0.5):.4f}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("guidance", ["none", "self", "initialize", "full"])
@pytest.mark.parametrize("stream_batch", [True, False])
def test_replayed_frames_match_eager_and_the_fp32_reference(pipes, guidance, stream_batch):
    inputs = frames(4, 128, 96)
    kw = {**OPTIONS, "guidance": guidance, "guidance_scale": 2.0, "stream_batch": stream_batch}
    graph = diffrt.Stream(pipes["graph"], **kw)
    assert graph.captures == 1
    replayed = pictures(graph, inputs)
    assert torch.isfinite(graph._noise).all() and (graph._state is None or torch.isfinite(graph._state).all())
    eager = pictures(diffrt.Stream(pipes["kernels"], **kw, cuda_graph=False), inputs)
    own_eager = pictures(diffrt.Stream(pipes["graph"], **kw, cuda_graph=False), inputs)  # for the printed diagnosis
    reference = pictures(diffrt.Stream(pipes["fp32"], **kw, cuda_graph=False), inputs)
    fp16 = pictures(diffrt.Stream(pipes["fp16"], **kw, cuda_graph=False), inputs)
    for i, (ours, same_kernels, own) in enumerate(zip(replayed, eager, own_eager, strict=True)):
        print(f"{guidance} stream_batch={stream_batch} frame {i}, in 8-bit levels: replay vs eager kernels "
              f"{_levels(ours, same_kernels)}; vs the graph pipeline's modules run eagerly {_levels(ours, own)}; "
              f"those two eager runs {_levels(same_kernels, own)}")  # fmt: skip
    for ours, same_kernels, ref, torchs in zip(replayed, eager, reference, fp16, strict=True):
        assert np.abs(ours - same_kernels).max() <= 1 / 255 + 1e-9, "the replay is not the eager run of its kernels"
        err, torch_err = np.abs(ours - ref).max(), np.abs(torchs - ref).max()
        assert err <= max(2 * torch_err, 4 / 255), f"graph {err:.3f} vs torch fp16 {torch_err:.3f}"
        assert ours.std() > 0.01, "a flat picture (NaN becomes 0 in 8 bits)"
    worst = max(np.abs(a - b).max() for a, b in zip(replayed, reference, strict=True))
    print(f"{guidance} stream_batch={stream_batch}: max abs error vs fp32 {worst:.3f}")


@pytest.mark.gpu
@gpu
def test_prompt_and_strength_changes_reach_the_graph_without_a_capture(pipes):
    (frame,) = frames(1, 128, 96)
    kw = {**OPTIONS, "steps": (40,)}
    stream = diffrt.Stream(pipes["graph"], **kw)
    call = stream._call
    first = stream(frame)[0].picture
    stream.update(prompt="a red car on a road", strength=0.6)
    changed = stream(frame)[0].picture
    assert stream._call is call and stream.captures == 1 and stream.replays == 2  # one graph, replayed per frame
    fresh = diffrt.Stream(pipes["graph"], **{**kw, "prompt": "a red car on a road", "steps": stream.config.steps})
    np.testing.assert_array_equal(changed, fresh(frame)[0].picture)
    assert not np.array_equal(first, changed)


@pytest.mark.gpu
@gpu
def test_txt2img_replays_match_eager(pipes):
    start = torch.randn((1, 4, 16, 12), generator=torch.Generator().manual_seed(1)).to("cuda", torch.float16)
    kw = {**OPTIONS, "mode": "txt2img", "steps": (0, 16, 32, 45)}
    graph, eager = diffrt.Stream(pipes["graph"], **kw), diffrt.Stream(pipes["kernels"], **kw, cuda_graph=False)
    a = [r.picture for _ in range(3) for r in graph.txt2img(start)] + [r.picture for r in graph.flush()]
    b = [r.picture for _ in range(3) for r in eager.txt2img(start)] + [r.picture for r in eager.flush()]
    for x, y in zip(a, b, strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("guidance", ["none", "initialize"])
def test_frames_per_call_replays_match_eager_and_one_frame_runs(pipes, guidance):
    """Three frames per graph run, stream batch on: each replayed picture is the eager run of the same kernels
    (within one level) and close to the one-frame stream's replay (the batch changes kernel blocking only), for
    seven frames (two full groups and a part group at the flush), never flat."""
    inputs = frames(7, 128, 96)
    kw = {**OPTIONS, "guidance": guidance, "guidance_scale": 2.0}
    grouped = pictures(diffrt.Stream(pipes["graph"], **kw, frames_per_call=3), inputs)
    eager = pictures(diffrt.Stream(pipes["kernels"], **kw, frames_per_call=3, cuda_graph=False), inputs)
    single = pictures(diffrt.Stream(pipes["graph"], **kw), inputs)
    for i, (ours, same_kernels, one) in enumerate(zip(grouped, eager, single, strict=True)):
        print(f"{guidance} frames_per_call=3 frame {i}: vs eager {_levels(ours, same_kernels)}; vs one frame per "
              f"call {_levels(ours, one)}")  # fmt: skip
        assert np.abs(ours - same_kernels).max() <= 1 / 255 + 1e-9
        assert np.abs(ours - one).max() <= 4 / 255 and ours.std() > 0.01
