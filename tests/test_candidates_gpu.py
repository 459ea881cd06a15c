"""The fast path's candidates not yet on by default (`-m gpu`, on the device): attention's projections in one GEMM
(ops.fuse_projections) and TAESD's epilogues (ops.taesd_epilogues), replayed from CUDA graphs, give the default fast
path's images within fp16 rounding, never NaN, at a square and a non-square size."""

import dataclasses

import pytest
import torch

import diffrt
from diffrt.backends.cuda_graph import CudaGraphBackend
from diffrt.models.ops import TRITON_OPS
from diffrt.models.taesd import AutoencoderTiny, TAESDConfig

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
CANDIDATES = dataclasses.replace(TRITON_OPS, name="triton+candidates", fuse_projections=True, taesd_epilogues=True)


def pipeline(ops, taesd: bool) -> diffrt.Pipeline:
    pipe = diffrt.Pipeline.from_pretrained("tiny-sd21", device="cuda", dtype=torch.float16,
                                           backend=CudaGraphBackend(ops))  # fmt: skip
    if taesd:
        torch.manual_seed(0)
        vae = AutoencoderTiny(TAESDConfig((16,) * 4, (16,) * 4, (1, 1, 1, 1), (1, 1, 1, 1)))
        components = dataclasses.replace(pipe.components, vae=vae)
        pipe = diffrt.Pipeline.from_components(components, device="cuda", dtype=torch.float16,
                                               backend=CudaGraphBackend(ops))  # fmt: skip
    return pipe


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("taesd", [False, True], ids=["vae", "taesd"])
@pytest.mark.parametrize("height,width", [(64, 64), (64, 96)])
def test_candidates_give_the_fast_paths_images(taesd, height, width):
    kw = {"height": height, "width": width, "steps": 2, "seed": 4, "output_type": "pt"}
    want = pipeline(TRITON_OPS, taesd)("a photo of a cat", **kw).float()
    got = pipeline(CANDIDATES, taesd)("a photo of a cat", **kw).float()
    assert torch.isfinite(got).all() and got.std() > 1e-3
    diff = (got - want).abs().max().item()
    print(f"taesd={taesd} {height}x{width}: max abs difference in 0..1 {diff:.4f}")
    assert diff <= 4 / 255, diff
