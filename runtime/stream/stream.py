"""diffrt.Stream: a pipeline prepared once for real-time img2img (one call per camera frame) or txt2img (one call per
image), StreamDiffusion's techniques (Kim et al. 2023, https://arxiv.org/abs/2312.12491) on diffrt's modules.

Prepared once: the prompt's embeddings, the fixed noise, the step coefficients, every static buffer. Per group of
frames_per_call frames (one frame by default), on a GPU: the frames are copied in from pinned memory, one CUDA graph
replays the encoder, the stream-batched denoise and the decoder, and the pictures are copied out; reading them is
the one host sync (the similarity filter, when on, adds one per frame). On a CPU the same function runs eagerly. A
prompt, strength or guidance change copies new values into the static buffers: no capture. Pictures come out in
frame order; with stream batch, len(steps) - 1 graph runs late.
"""

from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffrt.backends.graphs import CapturedCall, device_lock
from diffrt.models.embeddings import guidance_scale_embedding
from diffrt.sampler_registry import LCM_GUIDANCE_DEFAULT
from diffrt.samplers import NoiseSource
from diffrt.stream.codec import stream_codec
from diffrt.stream.coefficients import StepCoefficients, coefficient_rows, coefficient_table, stream_schedule
from diffrt.stream.config import DEFAULT_CFG_SCALE, RESIDUAL_GUIDANCE, StreamConfig, steps_for_strength
from diffrt.stream.denoise import GuidanceInputs, StreamDenoiser
from diffrt.stream.ordering import FrameOrder, StreamFrame, _Record
from diffrt.stream.pixels import frame_array, to_uint8, to_unit
from diffrt.stream.similarity import SimilarityFilter, cosine_similarity


class Stream:
    """`Stream(pipe, prompt=..., steps=(32, 45), ...)` (the fields of diffrt.stream.StreamConfig), then
    `stream(frame)` per frame (img2img) or `stream.txt2img()` per image: each returns the reports that are complete
    now, in order (diffrt.stream.StreamFrame); `flush()` at the end of a stream returns the rest. vae: another codec
    (a TAESD module or folder) instead of the pipeline's VAE. cuda_graph: replay each frame from a CUDA graph
    (default: on a GPU). One stream serves one caller at a time; make one per camera."""

    def __init__(self, pipe, config: StreamConfig | None = None, *, vae=None, cuda_graph: bool | None = None,
                 **options) -> None:  # fmt: skip
        # 1. Check the preparation against the model (host; raises before any work).
        config = StreamConfig(**options) if config is None else replace(config, **options)
        _check_fits(pipe, config)
        self.pipe, self.config = pipe, config
        self.device, self.dtype = _indexed(pipe.device), pipe.dtype
        self.codec = stream_codec(pipe, vae)
        spec, n, f = pipe.spec, len(config.steps), config.frames_per_call
        self._latent_shape = (1, spec.latent_channels, config.height // spec.vae_scale, config.width // spec.vae_scale)
        self._graphed = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self._graphed and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True replays CUDA graphs; this pipeline is on {self.device}")

        with torch.inference_mode():
            # 2. Host plan, once: step coefficients, embeddings, guidance, noise; each into a static device buffer.
            self._table = coefficient_table(self._rows(config.steps), self.device)
            guidance = self._guidance_scale(config)
            needs_uncond = config.guidance in ("initialize", "full")
            self._inputs = GuidanceInputs(
                embeds=self._encode(config.prompt).clone(),
                uncond_embeds=self._encode(config.negative_prompt).clone() if needs_uncond else None,
                timestep_cond=self._timestep_cond(guidance),
                scale=torch.tensor(guidance, dtype=torch.float32, device=self.device),
                delta=torch.tensor(config.delta, dtype=torch.float32, device=self.device),
            )
            self._generator = torch.Generator(self.device).manual_seed(config.seed)
            self._posterior, self._noise = self._fixed_noise(config, n)
            self._state = self._zeros(n - 1) if config.stream_batch and n > 1 else None
            residual = config.guidance in RESIDUAL_GUIDANCE
            self._stock = self._zeros(n - 1) if self._state is not None and residual else None
            if config.mode == "img2img":
                self._pixels = torch.zeros((f, config.height, config.width, 3), dtype=torch.uint8, device=self.device)
            else:
                self._start = self._zeros(1)
            clip = spec.scheduler.clip_sample_range if spec.scheduler.clip_sample else None
            self._denoiser = StreamDenoiser(pipe.roles.denoiser, config.guidance, self._inputs, clip, f)

            # 3. The per-frame device work, captured once on a GPU.
            self._call = CapturedCall(self._frame, self.device) if self._graphed else None
            for buffer in (self._state, self._stock):
                if buffer is not None:
                    buffer.zero_()  # capture ran the function on empty slots; start clean
        self._host_buffers()
        self._order = FrameOrder()
        self._group: list[_Record | None] = []  # the frames given since the last graph run (fewer than f)
        self._in_flight: list[list[_Record | None] | None] = [None] * config.delay  # groups at steps 1..n-1, by slot
        self._filter = None
        if config.similarity_threshold is not None and config.mode == "img2img":
            self._filter = SimilarityFilter(config.similarity_threshold, config.max_skipped, config.seed)
            self._reference = torch.zeros_like(self._pixels)
        self._last_drawn: _Record | None = None

    # -- per frame ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, frame: "Image.Image | np.ndarray | Tensor") -> list[StreamFrame]:
        """img2img: one frame (uint8 [H, W, 3] RGB or a PIL image) in; the reports complete now out."""
        if self.config.mode != "img2img":
            raise ValueError("this stream was prepared for txt2img: call stream.txt2img()")
        self._upload(frame_array(frame, self.config.height, self.config.width), len(self._group))
        if self._filter is not None and self._last_drawn is not None:  # (frames_per_call is 1 with the filter)
            similarity = float(cosine_similarity(self._pixels[0], self._reference))  # the filter's host sync
            if self._filter.skip(similarity):
                self._order.skip(self._last_drawn)
                if self.frames_in_flight:
                    self._advance([None])  # a bubble: the frames ahead keep moving and come out on time
                return self._order.ready()
        self._last_drawn = self._order.admit()
        if self._filter is not None:
            self._reference.copy_(self._pixels[0])
        self._add(self._last_drawn)
        return self._order.ready()

    @torch.inference_mode()
    def txt2img(self, start: Tensor | None = None) -> list[StreamFrame]:
        """txt2img: one more image; start: its initial noise [1, C, h, w] (default: the next draw of the stream's
        generator, on the device)."""
        if self.config.mode != "txt2img":
            raise ValueError("this stream was prepared for img2img: call stream(frame)")
        row = self._start[len(self._group)][None]
        if start is not None:
            row.copy_(start)
        else:
            row.copy_(torch.randn(self._latent_shape, generator=self._generator, device=self.device, dtype=self.dtype))
        self._add(self._order.admit())
        return self._order.ready()

    @torch.inference_mode()
    def flush(self) -> list[StreamFrame]:
        """The end of a stream: run the in-flight frames to their pictures (bubbles behind them) and return every
        report still waiting. The stream stays usable; the next frame starts an empty stream batch."""
        if self._group:  # a part group runs now, its empty places as bubbles
            self._run_group()
        while any(g is not None for g in self._in_flight):
            self._advance(None)
        return self._order.ready()

    def drop(self) -> list[StreamFrame]:
        """Report one frame as dropped (a caller that fell behind and discarded it unseen); it takes the next index."""
        self._order.drop()
        return self._order.ready()

    # -- changes without a new capture ---------------------------------------------------------------------------

    @torch.inference_mode()
    def update(self, *, prompt: str | None = None, negative_prompt: str | None = None,
               steps: tuple[int, ...] | None = None, strength: float | None = None,
               guidance_scale: float | None = None, delta: float | None = None) -> StreamConfig:  # fmt: skip
        """Change what the captured graph reads: a prompt (encoded into the static embeddings), the steps (or a
        strength, mapped to as many steps as before) and their coefficients, the guidance scale or delta. Frames
        already in flight finish under the new values."""
        c = self.config
        if strength is not None:
            steps = steps_for_strength(strength, len(c.steps), c.num_inference_steps)
        if steps is not None and len(steps) != len(c.steps):
            raise ValueError(f"{len(steps)} steps instead of {len(c.steps)} change the UNet batch; make a new Stream")
        changes = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                   "guidance_scale": guidance_scale, "delta": delta}  # fmt: skip
        new = replace(c, **{k: v for k, v in changes.items() if v is not None})
        _check_fits(self.pipe, new)
        if new.prompt != c.prompt:
            self._inputs.embeds.copy_(self._encode(new.prompt))
        if new.negative_prompt != c.negative_prompt and self._inputs.uncond_embeds is not None:
            self._inputs.uncond_embeds.copy_(self._encode(new.negative_prompt))
        if new.steps != c.steps:
            self._table.copy_(coefficient_table(self._rows(new.steps), self.device))
        scale = self._guidance_scale(new)
        self._inputs.scale.fill_(scale)
        if self._inputs.timestep_cond is not None:
            self._inputs.timestep_cond.copy_(self._timestep_cond(scale))
        self._inputs.delta.fill_(new.delta)
        self.config = new
        return new

    @property
    def guidance_scale(self) -> float:
        """The guidance scale in use (the config's, or the default it stood for)."""
        return self._guidance_scale(self.config)

    @property
    def captures(self) -> int:
        """CUDA graphs captured by this stream (1 on the graph path, whatever was updated since; 0 eagerly)."""
        return 0 if self._call is None else 1

    @property
    def replays(self) -> int:
        return 0 if self._call is None else self._call.replays

    @property
    def frames_in_flight(self) -> int:
        """Frames given whose pictures have not come out: in the stream batch's slots or waiting for their group."""
        in_slots = sum(r is not None for g in self._in_flight if g is not None for r in g)
        return in_slots + sum(r is not None for r in self._group)

    # -- the device work of one call -----------------------------------------------------------------------------

    def _frame(self) -> tuple[Tensor]:
        """Encode the newest frame (or take its start noise), denoise the stream batch, decode: device work only."""
        k = StepCoefficients.of(self._table)
        if self.config.mode == "img2img":
            noise = None if self._posterior is None else _Fixed(self._posterior)
            z = self.codec.encode(to_unit(self._pixels), noise)
            x_new = (z * k.signal[:1] + self._noise[:1] * k.noise[:1]).to(self.dtype)  # the pipeline's add_noise
            # self-negative RCFG: a frame's first residual is the noise it was given
            residual_new = self._noise[:1].expand(self.config.frames_per_call, -1, -1, -1)
        else:
            x_new = residual_new = self._start
        if self._state is None:
            latents = self._denoiser.per_frame(x_new, residual_new, self._noise, k)
        else:
            latents = self._denoiser.batched(x_new, residual_new, self._state, self._stock, self._noise, k)
        return (to_uint8(self.codec.decode(latents)),)

    def _add(self, entry: _Record) -> None:
        """A frame joins the current group; a full group runs."""
        self._group.append(entry)
        if len(self._group) == self.config.frames_per_call:
            self._run_group()

    def _run_group(self) -> None:
        group = self._group + [None] * (self.config.frames_per_call - len(self._group))
        self._group = []
        if self.config.mode == "img2img" and self._filter is None:  # (with the filter each frame went at once)
            self._send()
        self._advance(group)

    def _advance(self, group: list[_Record | None] | None) -> None:
        """One graph run: `group` (None or None entries: bubbles) enters at step 0; the group at the last step gets
        its pictures."""
        if self._graphed:
            with device_lock(self.device):
                (pictures,) = self._call.replay()
        else:
            (pictures,) = self._frame()
        done = group
        if self._in_flight:
            done, self._in_flight = self._in_flight[-1], [group, *self._in_flight[:-1]]
        if done is not None and any(r is not None for r in done):
            for record, picture in zip(done, self._download(pictures), strict=True):
                if record is not None:
                    record.finish(picture)

    def _host_buffers(self) -> None:
        """Pinned host buffers for the frame in and the picture out (asynchronous copies on the GPU path)."""
        self._staging = self._picture_host = None
        if self.device.type == "cuda":
            pinned = {"dtype": torch.uint8, "pin_memory": True}
            frames = (self.config.frames_per_call, self.config.height, self.config.width, 3)
            self._staging = torch.empty(frames, **pinned)
            self._picture_host = torch.empty(frames, **pinned)
            self._copied, self._uploaded = torch.cuda.Event(), torch.cuda.Event()

    def _upload(self, pixels: "np.ndarray | Tensor", place: int) -> None:
        """The frame into place `place` of the group's pixels (the staging buffer's, sent when the group is full,
        or at once when the similarity filter must compare it)."""
        # The pinned staging buffer is free to overwrite only once the previous frame's copy out of it has run. That
        # copy is queued behind the previous replay, and a call that finishes no frame (the first len(steps) - 1
        # calls of a stream batch) has no host sync: without this wait the host wrote frame k+1 over frame k before
        # the GPU had copied it, and frame k was denoised from frame k+1's pixels (seen on the H200).
        if self._staging is not None:
            self._uploaded.synchronize()
        target = (self._pixels if self._staging is None else self._staging)[place]
        if isinstance(pixels, np.ndarray):
            target.numpy()[...] = pixels  # one host copy, also from a read-only array (a decoded image's)
        else:
            target.copy_(pixels)
        if self._filter is not None:
            self._send()

    def _send(self) -> None:
        """The staging buffer's frames to the device, asynchronously (the next _upload waits for the copy)."""
        if self._staging is not None:
            self._pixels.copy_(self._staging, non_blocking=True)
            self._uploaded.record()

    def _download(self, pictures: Tensor) -> list[np.ndarray]:
        if self._picture_host is None:
            return list(pictures.numpy())
        self._picture_host.copy_(pictures, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()  # the graph run's one host sync
        return list(self._picture_host.numpy().copy())

    # -- host helpers --------------------------------------------------------------------------------------------

    def _rows(self, steps: tuple[int, ...]) -> list[list[float]]:
        scheduler = self.pipe.spec.scheduler
        schedule = stream_schedule(scheduler, steps, self.config.num_inference_steps)
        return coefficient_rows(schedule, scheduler.prediction_type)

    def _encode(self, prompt: str) -> Tensor:
        embeds, _ = self.pipe.encode_prompt([prompt])
        return embeds.to(self.dtype)

    def _guidance_scale(self, config: StreamConfig) -> float:
        if config.guidance_scale is not None:
            return config.guidance_scale
        return LCM_GUIDANCE_DEFAULT if self.pipe.spec.guidance_embedding_dim else DEFAULT_CFG_SCALE

    def _timestep_cond(self, scale: float) -> Tensor | None:
        """An LCM UNet's guidance embedding of w = scale - 1 (Luo et al. 2023, Sec. 4.3), as the pipeline makes it."""
        dim = self.pipe.spec.guidance_embedding_dim
        if dim is None:
            return None
        return guidance_scale_embedding(torch.full((1,), scale - 1), dim).to(self.device, self.dtype)

    def _fixed_noise(self, config: StreamConfig, n: int) -> tuple[Tensor | None, Tensor]:
        """The stream's fixed noise, drawn in the order the pipeline draws the same request's: img2img the VAE
        posterior's (a KL VAE only) and the first step's, then one per later step; txt2img's first step has none
        (its start noise comes per image). Same seed, same numbers: a stream frame is a pipeline call."""
        draw, shape = NoiseSource(self._generator), self._latent_shape
        posterior = None
        if config.mode == "img2img" and getattr(self.codec, "has_posterior", False):
            posterior = draw(shape, self.codec.vae_dtype, self.device)
        first = draw(shape, self.dtype, self.device) if config.mode == "img2img" else self._zeros(1)[:1]
        return posterior, torch.cat([first, *(draw(shape, self.dtype, self.device) for _ in range(n - 1))])

    def _zeros(self, slots: int) -> Tensor:
        """Latents for `slots` stream-batch slots of frames_per_call frames each."""
        rows = slots * self.config.frames_per_call
        return torch.zeros((rows, *self._latent_shape[1:]), dtype=self.dtype, device=self.device)


class _Fixed(NoiseSource):
    """The VAE posterior's noise: the stream's fixed buffer."""

    def __init__(self, buffer: Tensor) -> None:
        super().__init__()
        self.buffer = buffer

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        assert tuple(shape[1:]) == tuple(self.buffer.shape[1:]), "the codec drew other posterior noise than prepared"
        return self.buffer.expand(shape)  # the same noise for each frame of a group, as for each frame of a stream


def _indexed(device: torch.device) -> torch.device:
    """A bare "cuda" as "cuda:N", the device its tensors report: graph pools and locks (diffrt.backends.graphs) are
    kept per device, and the pipeline's own graphs key them by their tensors' device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _check_fits(pipe, config: StreamConfig) -> None:
    """ValueError naming each reason this pipeline cannot stream this preparation."""
    spec, problems = pipe.spec, []
    if pipe.components is None:
        problems.append(f"backend {pipe.backend.name!r} runs an export; the stream runs diffrt's torch modules")
    if spec.sdxl:
        problems.append("SDXL's added conditioning is not wired into the stream; SD 1.x/2.x models stream")
    if spec.controlnets:
        problems.append("ControlNets are not wired into the stream")
    for name in ("height", "width"):
        value = getattr(config, name)
        if value < spec.vae_scale or value % spec.vae_scale:
            problems.append(f"{name} {value} is not a positive multiple of {spec.vae_scale}")
    if config.guidance != "none" and spec.guidance_embedding_dim is not None:
        problems.append(f"guidance {config.guidance!r}: this UNet embeds its guidance scale (LCM), so it has no "
                        "unconditional pass to guide with; use guidance='none' with guidance_scale")  # fmt: skip
    prediction = spec.scheduler.prediction_type
    if config.guidance in RESIDUAL_GUIDANCE and prediction != "epsilon":
        problems.append(f"guidance {config.guidance!r}: residual CFG is defined on predicted noise (StreamDiffusion); "
                        f"this model predicts {prediction!r}; use 'full' or 'none'")  # fmt: skip
    if problems:
        raise ValueError("; ".join(problems))
