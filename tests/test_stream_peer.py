"""diffrt.Stream against StreamDiffusion 0.1.1 itself (the peer the benchmark measures) on the same tiny random
weights, fixed noise and TAESD: with stream batch, every frame's picture is StreamDiffusion's, within one 8-bit level,
under each of its guidance modes (none, the residual CFGs "self" and "initialize", full CFG): the techniques are
StreamDiffusion's as it defines them. StreamDiffusion pins diffusers 0.24 but runs on the test extra's diffusers when
installed with `pip install --no-deps streamdiffusion==0.1.1` (.ci/run does); without it this test is skipped."""

import numpy as np
import pytest
import torch

import diffrt
from benchmarks.peers import diffusers_vae
from diffrt.models.taesd import AutoencoderTiny, TAESDConfig
from tests.helpers.pipeline_fixtures import diffusers_pipeline, save_pipeline
from tests.helpers.stream_fixtures import frames, one_thread  # noqa: F401 (a fixture)

streamdiffusion = pytest.importorskip("streamdiffusion", reason="pip install --no-deps streamdiffusion==0.1.1")
STEPS = (10, 25, 40)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd1"))
    theirs = diffusers_pipeline("sd1", root, save_pipeline("sd1", root), "lcm")
    # TAESD with the tiny VAE's scale (2 levels: f=2), so that both read the same latent size; no posterior noise.
    taesd = AutoencoderTiny(TAESDConfig((16, 16), (16, 16), (1, 1), (1, 1)))
    return diffrt.Pipeline.from_pretrained(root), theirs, taesd


@pytest.mark.parametrize("guidance", ["none", "self", "initialize", "full"])
def test_stream_frames_are_streamdiffusions(models, guidance):
    ours, theirs, taesd = models
    peer = streamdiffusion.StreamDiffusion(theirs, t_index_list=list(STEPS), torch_dtype=torch.float32, width=32,
                                           height=32, use_denoising_batch=True, cfg_type=guidance)  # fmt: skip
    peer.vae = diffusers_vae(taesd)
    peer.prepare("a cat", num_inference_steps=50, guidance_scale=1.2)  # its RCFG runs only above 1
    stream = diffrt.Stream(ours, prompt="a cat", height=32, width=32, steps=STEPS, guidance=guidance,
                           guidance_scale=1.2, vae=taesd)  # fmt: skip
    with torch.inference_mode():
        stream._noise.copy_(peer.init_noise)  # its fixed noise: one draw of [steps, 4, h, w] from its generator
    inputs = frames(4, 32)
    pictures, reports = [], []
    with torch.inference_mode():
        for f in inputs:  # StreamDiffusion.__call__ without its CUDA timing events: encode, stream batch, decode
            pixels = peer.image_processor.preprocess(torch.from_numpy(f).permute(2, 0, 1)[None] / 255, 32, 32)
            image = peer.decode_image(peer.predict_x0_batch(peer.encode_image(pixels)))
            pictures.append(((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            reports += stream(f)
    reports += stream.flush()
    delay = len(STEPS) - 1  # its first outputs come from its zero-filled batch buffer; ours are held back instead
    for report in reports[: len(inputs) - delay]:
        diff = np.abs(report.picture.astype(int) - pictures[report.index + delay].astype(int))
        assert diff.max() <= 1, (report.index, diff.max())
    assert pictures[-1].std() > 5
