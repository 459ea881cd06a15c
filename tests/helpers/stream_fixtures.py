"""Test-only: the pipelines the stream tests run (the embedded default model and tiny random SD configs), frames,
and a stream driven to its end."""

import numpy as np
import pytest
import torch

import diffrt
from diffrt.stream import StreamFrame

RED_CIRCLE = "a large red circle in the center, white background"
BLUE_SQUARE = "a large blue square in the center, yellow background"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny (64x64): on the 2-core CI machine torch's second thread made calls 10-30x slower and
    erratic (measured: 45 ms per call with one thread, 0.05-1.9 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def frames(count: int, height: int = 64, width: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Distinct random 8-bit RGB frames."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width or height, 3), dtype=np.uint8) for _ in range(count)]


def run(stream: diffrt.Stream, inputs: list) -> list[StreamFrame]:
    """Every input through the stream, then a flush: all reports in the order they came out."""
    out = []
    for frame in inputs:
        out += stream(frame)
    return out + stream.flush()
