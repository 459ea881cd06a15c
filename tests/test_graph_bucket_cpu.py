"""The cuda-graph backend's buckets on a CPU: what reaches a captured generation on each call.

A graph replays the device work its function issued at capture, on the static buffers it closed over. Here a
stand-in for CapturedCall runs the function again on each replay, on those same buffers: work the bucket does
outside its function (once, at construction) is not redone, as in a graph; host decisions inside it are redone,
unlike a graph (the GPU tests in test_cuda_graph.py hold those). So a call that falls into a captured bucket must
give the eager pipeline's images for its own prompt, seed and guidance scale: a per-call input that does not reach
the static buffers, or work prepared once outside the replay (the text's cross-attention keys and values under
ops.joint_cross_attention), shows as the first call's images.
"""

import dataclasses

import numpy as np
import pytest
import torch

from diffrt.backends import cuda_graph
from diffrt.backends.cuda_graph import CudaGraphBackend
from diffrt.backends.eager import EagerBackend
from diffrt.models.ops import TORCH_OPS
from diffrt.pipeline import Pipeline

JOINT = dataclasses.replace(TORCH_OPS, name="torch+joint-cross-attention", joint_cross_attention=True)


class ReplayByRerun:
    """CapturedCall's interface; replay runs `fn` again on the buffers it closes over."""

    def __init__(self, fn, device: torch.device) -> None:
        self.fn, self.outputs, self.pool_bytes, self.replays = fn, tuple(fn()), 0, 0

    def replay(self) -> tuple[torch.Tensor, ...]:
        self.replays += 1
        return tuple(t.clone() for t in self.fn())


@pytest.fixture
def bucketed(monkeypatch):
    """(pipeline whose generations go through cuda_graph's buckets, the eager pipeline on the same weights)."""
    monkeypatch.setattr(cuda_graph, "CapturedCall", ReplayByRerun)

    def make(preset: str):
        eager = Pipeline.from_pretrained(preset, backend=EagerBackend("torch+joint", JOINT))
        graphs = Pipeline.from_pretrained(preset, backend=EagerBackend("torch+joint", JOINT))
        graphs.backend = CudaGraphBackend(ops=JOINT, channels_last=False)  # the roles stay eager: a CPU has no graphs
        return graphs, eager

    return make


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize(  # guidance 1 runs no CFG, a scale above it does: another bucket, so each case keeps one
    ("sampler", "scales"), [("lcm", (1.0, 1.0)), ("euler", (5.0, 6.5))], ids=["lcm", "euler-cfg"]
)
def test_a_replayed_bucket_generates_each_calls_own_prompt_seed_and_scale(bucketed, preset, sampler, scales):
    graphs, eager = bucketed(preset)
    kw = {"steps": 2, "sampler": sampler, "height": 64, "width": 64, "output_type": "np"}
    first = graphs("a red cube on a table", guidance_scale=scales[0], seed=1, **kw)
    later = graphs("a blue sphere in the snow", guidance_scale=scales[1], seed=2, **kw)
    assert len(graphs.backend.buckets()) == 1 and graphs.backend.buckets()[0]["replays"] == 2  # each call replays
    expected = eager("a blue sphere in the snow", guidance_scale=scales[1], seed=2, **kw)
    assert np.abs(later - expected).max() <= 1e-5, "the replay did not see the later call's inputs"
    assert np.abs(later - first).max() > 1e-3  # the two calls' inputs differ enough to tell them apart
