"""diffrt.Stream on a CPU: a stream call is the pipeline's img2img/txt2img call for the same noise (identical 8-bit
pictures), the stream batch is a scheduling change only, reports come out complete and in order with the stream
batch's delay, skipped and dropped frames are reported, prompt and strength change in place, and what cannot stream
is refused with the reason."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffrt
from diffrt.cli_generate import DEFAULT_MODEL
from diffrt.stream import DONE, DROPPED, SKIPPED, StreamConfig, steps_for_strength
from diffrt.stream.coefficients import StepCoefficients, coefficient_rows, coefficient_table, stream_schedule
from diffrt.stream.denoise import GuidanceInputs, StreamDenoiser
from tests.helpers.stream_fixtures import RED_CIRCLE, frames, one_thread, run  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def default_pipe() -> diffrt.Pipeline:
    return diffrt.Pipeline.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tiny_pipe() -> diffrt.Pipeline:
    """A tiny random SD 1.x (epsilon, no guidance embedding: every guidance mode runs)."""
    return diffrt.Pipeline.from_pretrained("tiny-sd15")


def tiny_stream(pipe, **options) -> diffrt.Stream:
    return diffrt.Stream(pipe, **{"prompt": "a cat", "height": 64, "width": 64, "steps": (10, 25, 40), **options})


@pytest.mark.parametrize("steps,strength", [((3,), 0.25), ((2, 3), 0.5)])
def test_a_stream_frame_is_the_pipelines_img2img(default_pipe, steps, strength):
    """Stream batch off: the frame's picture equals pipe(image=..., strength=...) with the LCM sampler on the same
    seed, bit for bit in 8 bits (the stream draws its fixed noise in the pipeline's order: posterior, first step, then
    each later step), for one step and for the last two of four."""
    (frame,) = frames(1)
    stream = diffrt.Stream(default_pipe, prompt=RED_CIRCLE, height=64, width=64, steps=steps, num_inference_steps=4,
                           stream_batch=False, seed=7)  # fmt: skip
    (report,) = stream(frame)
    ref = default_pipe(RED_CIRCLE, image=Image.fromarray(frame), strength=strength, steps=4, sampler="lcm", seed=7,
                       output_type="pil")[0]  # fmt: skip
    assert report.index == 0 and report.status == DONE and report.picture.shape == (64, 64, 3)
    np.testing.assert_array_equal(report.picture, np.asarray(ref))
    assert np.asarray(ref).std() > 5, "a flat reference would prove little"


def test_a_stream_image_is_the_pipelines_txt2img(default_pipe):
    """txt2img, all four LCM steps, stream batch off: the pipeline's picture from the same start noise and seed."""
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    stream = diffrt.Stream(default_pipe, prompt=RED_CIRCLE, height=64, width=64, steps=(0, 1, 2, 3),
                           num_inference_steps=4, mode="txt2img", stream_batch=False, seed=11)  # fmt: skip
    (report,) = stream.txt2img(start)
    ref = default_pipe(RED_CIRCLE, latents=start, steps=4, sampler="lcm", seed=11, output_type="pil")[0]
    np.testing.assert_array_equal(report.picture, np.asarray(ref))


@pytest.mark.parametrize("guidance", ["none", "self", "initialize", "full"])
def test_the_stream_batch_is_a_scheduling_change(tiny_pipe, guidance):
    """The denoised latents of each frame, three frames in flight at three steps in one UNet batch, equal those of
    the same frame run step by step (fp32, within 1e-4 absolute and relative, measured up to 8e-5 on values ~5: the
    UNet treats each batch entry alone, only its kernels' blocking differs with the batch size), under every
    guidance mode."""
    spec, n = tiny_pipe.spec, 3
    rows = coefficient_rows(stream_schedule(spec.scheduler, (10, 25, 40), 50), "epsilon")
    k = StepCoefficients.of(coefficient_table(rows, torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    embeds, uncond = (torch.randn(1, 77, 32, generator=g) for _ in range(2))
    inputs = GuidanceInputs(embeds, uncond, None, torch.tensor(2.5), torch.tensor(0.8))
    denoiser = StreamDenoiser(tiny_pipe.roles.denoiser, guidance, inputs, None)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    starts = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(5)]
    state, stock = torch.zeros(n - 1, 4, 8, 8), torch.zeros(n - 1, 4, 8, 8)
    with torch.inference_mode():
        batched = [denoiser.batched(x, noise[:1], state, stock, noise, k) for x in starts + [starts[0]] * (n - 1)]
        alone = [denoiser.per_frame(x, noise[:1], noise, k) for x in starts]
    for i, latents in enumerate(alone):  # frame i comes out of call i + n - 1
        torch.testing.assert_close(batched[i + n - 1], latents, atol=1e-4, rtol=1e-4)
    assert alone[0].std() > 0.1


@pytest.mark.parametrize("guidance", ["none", "initialize"])
def test_batched_and_per_frame_pictures_agree(tiny_pipe, guidance):
    """End to end (encode, stream batch, decode), the 8-bit pictures of each frame within one level of the
    step-by-step run's (the rounding of values that differ by ~1e-6) and nearly all identical."""
    inputs = frames(4)
    a = run(tiny_stream(tiny_pipe, guidance=guidance, guidance_scale=2.0), inputs)
    b = run(tiny_stream(tiny_pipe, guidance=guidance, guidance_scale=2.0, stream_batch=False), inputs)
    assert [r.index for r in a] == [r.index for r in b] == [0, 1, 2, 3]
    for x, y in zip(a, b, strict=True):
        diff = np.abs(x.picture.astype(int) - y.picture.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_reports_come_out_complete_in_order_after_the_delay(tiny_pipe):
    """Three steps in one batch: the first two calls return nothing (the stream batch fills), then one report per
    call, frame order; flush returns the two still in flight; after a flush the next frame starts an empty batch."""
    stream = tiny_stream(tiny_pipe)
    assert stream.config.delay == 2
    per_call = [[r.index for r in stream(f)] for f in frames(5)]
    assert per_call == [[], [], [0], [1], [2]]
    assert [r.index for r in stream.flush()] == [3, 4] and stream.frames_in_flight == 0
    assert stream(frames(1, seed=9)[0]) == []
    (last,) = stream.flush()
    assert last.index == 5 and last.status == DONE and last.picture.shape == (64, 64, 3) and last.latency_ms > 0


def test_similar_frames_are_skipped_and_reported_as_repeats(tiny_pipe):
    """A repeated frame is skipped (cosine 1 > 0.98) and reported, in order, as a repeat of the frame whose picture
    it carries; while frames are in flight a skip advances the batch with an empty slot (they still come out), and
    with none in flight it costs nothing; a new frame is drawn; max_skipped bounds skips in a row."""
    a, b = frames(2)
    stream = tiny_stream(tiny_pipe, steps=(20, 40), similarity_threshold=0.98)
    assert stream(a) == []
    first, repeat = stream(a)  # the bubble pushed frame 0 out; frame 1 repeats it
    assert (first.index, first.status) == (0, DONE)
    assert (repeat.index, repeat.status, repeat.repeat_of) == (1, SKIPPED, 0) and repeat.skipped
    np.testing.assert_array_equal(repeat.picture, first.picture)
    (again,) = stream(a)  # nothing in flight: no work at all
    assert (again.index, again.status, again.repeat_of) == (2, SKIPPED, 0)
    assert stream(b) == []
    (drawn,) = stream.flush()
    assert (drawn.index, drawn.status) == (3, DONE) and not np.array_equal(drawn.picture, first.picture)

    bounded = tiny_stream(tiny_pipe, steps=(40,), similarity_threshold=0.98, max_skipped=1)
    statuses = [r.status for f in [a, a, a, a] for r in bounded(f)]
    assert statuses == [DONE, SKIPPED, DONE, SKIPPED]


def test_dropped_frames_keep_their_place(tiny_pipe):
    stream = tiny_stream(tiny_pipe, steps=(20, 40))
    f0, f2 = frames(2)
    assert stream(f0) == [] and stream.drop() == []  # the drop waits behind frame 0
    reports = stream(f2)
    assert [(r.index, r.status) for r in reports] == [(0, DONE), (1, DROPPED)] and reports[1].picture is None
    assert [(r.index, r.status) for r in stream.flush()] == [(2, DONE)]


def test_prompt_and_strength_change_in_place(default_pipe):
    """update() copies a new prompt's embeddings and new steps' coefficients into the static buffers: the next
    picture is a fresh stream's with those settings, from the same stream object."""
    (frame,) = frames(1)
    options = {"height": 64, "width": 64, "num_inference_steps": 4, "stream_batch": False, "seed": 2}
    stream = diffrt.Stream(default_pipe, prompt=RED_CIRCLE, steps=(3,), **options)
    before = stream(frame)[0].picture
    stream.update(prompt="a small green star on the left, black background", strength=0.5)
    assert stream.config.steps == steps_for_strength(0.5, 1, 4) == (1,)
    changed = stream(frame)[0].picture
    fresh = diffrt.Stream(default_pipe, prompt="a small green star on the left, black background", steps=(1,),
                          **options)(frame)[0].picture  # fmt: skip
    np.testing.assert_array_equal(changed, fresh)
    assert np.abs(changed.astype(int) - before.astype(int)).mean() > 5


def test_guidance_modes_reach_the_picture(tiny_pipe):
    """Each guidance mode changes the picture (a random model's prompt matters little, hence the low bar), and the
    same mode twice gives the same picture."""
    (frame,) = frames(1)

    def picture(guidance: str) -> np.ndarray:
        stream = tiny_stream(tiny_pipe, guidance=guidance, guidance_scale=7.5, steps=(25, 40), stream_batch=False)
        return stream(frame)[0].picture.astype(int)

    none = picture("none")
    np.testing.assert_array_equal(picture("none"), none)
    for g in ["self", "initialize", "full"]:
        assert np.abs(picture(g) - none).mean() > 0.5, g


def test_taesd_codec_is_the_pipelines_with_taesd(tiny_pipe):
    """vae=AutoencoderTiny: the stream's frame equals a pipeline whose VAE is that TAESD (no posterior noise)."""
    from dataclasses import replace

    from diffrt.models.taesd import AutoencoderTiny, TAESDConfig

    taesd = AutoencoderTiny(TAESDConfig.preset("tiny"))
    taesd_pipe = diffrt.Pipeline.from_components(replace(tiny_pipe.components, vae=taesd))
    (frame,) = frames(1)
    (report,) = tiny_stream(tiny_pipe, vae=taesd, steps=(4,), num_inference_steps=5, seed=4)(frame)
    ref = taesd_pipe("a cat", image=Image.fromarray(frame), strength=0.2, steps=5, sampler="lcm", seed=4)[0]
    np.testing.assert_array_equal(report.picture, np.asarray(ref))


def test_what_cannot_stream_is_refused(default_pipe, tiny_pipe):
    with pytest.raises(ValueError, match="embeds its guidance scale"):
        diffrt.Stream(default_pipe, prompt="x", height=64, width=64, guidance="self")
    with pytest.raises(ValueError, match="residual CFG is defined on predicted noise"):
        diffrt.Stream(diffrt.Pipeline.from_pretrained("tiny-sd21"), prompt="x", height=64, width=64, guidance="self")
    with pytest.raises(ValueError, match="strictly increasing"):
        StreamConfig(prompt="x", steps=(3, 3))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        StreamConfig(prompt="x", steps=(4,), num_inference_steps=4)
    with pytest.raises(ValueError, match="not a positive multiple of 8"):
        tiny_stream(tiny_pipe, height=60)
    stream = tiny_stream(tiny_pipe)
    with pytest.raises(ValueError, match=r"must be uint8 \[64, 64, 3\]"):
        stream(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="prepared for img2img"):
        stream.txt2img()
    with pytest.raises(ValueError, match="change the UNet batch"):
        stream.update(steps=(10, 40))
    with pytest.raises(ValueError, match="raise it to >= 0.05"):
        steps_for_strength(0.01, 3, 50)


@pytest.mark.parametrize("guidance", ["none", "self", "initialize", "full"])
@pytest.mark.parametrize("stream_batch", [True, False])
def test_frames_per_call_is_a_scheduling_change(tiny_pipe, guidance, stream_batch):
    """Two frames per graph run (StreamDiffusion's frame_buffer_size): each frame's picture is the one-frame stream's
    (within one 8-bit level, nearly all identical: only the kernels' blocking changes with the batch), in order,
    the odd last frame run as a part group by flush; the UNet batch holds every slot's two frames."""
    inputs = frames(5)
    options = {"guidance": guidance, "guidance_scale": 2.0, "stream_batch": stream_batch}
    one = run(tiny_stream(tiny_pipe, **options), inputs)
    stream = tiny_stream(tiny_pipe, **options, frames_per_call=2)
    two = run(stream, inputs)
    assert [r.index for r in two] == [r.index for r in one] == [0, 1, 2, 3, 4]
    assert all(r.status == DONE and r.picture.shape == (64, 64, 3) for r in two)
    for x, y in zip(one, two, strict=True):
        diff = np.abs(x.picture.astype(int) - y.picture.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert len({r.picture.tobytes() for r in two}) == 5, "distinct frames give distinct pictures"
    assert stream._state is None or stream._state.shape[0] == 2 * 2  # two slots in flight, two frames each


def test_frames_per_call_groups_come_out_after_the_delay(tiny_pipe):
    """Three steps, two frames per run: frames 0 and 1 enter with the second call, reach the last step two runs
    later (the sixth call) and come out together; flush runs the rest, part groups included."""
    stream = tiny_stream(tiny_pipe, frames_per_call=2)
    per_call = [[r.index for r in stream(f)] for f in frames(7)]
    assert per_call == [[], [], [], [], [], [0, 1], []]
    assert stream.frames_in_flight == 5
    assert [r.index for r in stream.flush()] == [2, 3, 4, 5, 6] and stream.frames_in_flight == 0


def test_frames_per_call_txt2img_from_given_starts(tiny_pipe):
    """txt2img two images per run: from the same start noise, the one-image stream's pictures."""
    g = torch.Generator().manual_seed(1)
    starts = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(4)]

    def pictures(f: int) -> list[np.ndarray]:
        stream = tiny_stream(tiny_pipe, mode="txt2img", steps=(25, 40), frames_per_call=f)
        return [r.picture.astype(int) for s in starts for r in stream.txt2img(s)] + [
            r.picture.astype(int) for r in stream.flush()
        ]

    for a, b in zip(pictures(1), pictures(2), strict=True):
        assert np.abs(a - b).max() <= 1


def test_frames_per_call_is_checked():
    with pytest.raises(ValueError, match="frames_per_call 0 must be an integer >= 1"):
        StreamConfig(prompt="x", frames_per_call=0)
    with pytest.raises(ValueError, match="similarity filter decides frame by frame"):
        StreamConfig(prompt="x", frames_per_call=2, similarity_threshold=0.98)
