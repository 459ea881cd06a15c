"""The fast path's latest optimizations (`-m gpu`, on the device): with attention's projections in one GEMM
(ops.fuse_projections), TAESD's epilogues (ops.taesd_epilogues) and the transformer blocks' residuals added in their
projections' GEMMs (ops.fuse_residuals), the CUDA-graph pipeline gives the images it gives without them within fp16
rounding, never NaN, at a square and a non-square size."""

import dataclasses

import pytest
import torch

import diffrt
from diffrt.backends.cuda_graph import CudaGraphBackend
from diffrt.models.ops import TRITON_OPS
from diffrt.models.taesd import AutoencoderTiny, TAESDConfig

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
WITHOUT = dataclasses.replace(
    TRITON_OPS, name="triton-previous", fuse_projections=False, taesd_epilogues=False, fuse_residuals=False
)


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
def test_the_fast_path_gives_the_images_it_gave_without_them(taesd, height, width):
    assert TRITON_OPS.fuse_projections and TRITON_OPS.taesd_epilogues and TRITON_OPS.fuse_residuals
    kw = {"height": height, "width": width, "steps": 2, "seed": 4, "output_type": "pt"}
    want = pipeline(WITHOUT, taesd)("a photo of a cat", **kw).float()
    got = pipeline(TRITON_OPS, taesd)("a photo of a cat", **kw).float()
    assert torch.isfinite(got).all() and got.std() > 1e-3
    diff = (got - want).abs().max().item()
    print(f"taesd={taesd} {height}x{width}: max abs difference in 0..1 {diff:.4f}")
    assert diff <= 4 / 255, diff
