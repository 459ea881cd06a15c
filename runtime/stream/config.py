"""What a stream is prepared for: prompt, size, step indices, guidance mode and the per-frame options.

Steps are StreamDiffusion's `t_index_list`: indices into the LCM schedule of `num_inference_steps` steps (LCM's
timesteps 999, 979, ... for 50), one UNet evaluation each. A strength maps to evenly spaced indices ending at the
last step, as StreamDiffusion's `generate_t_index_list` does.
"""

import math
from dataclasses import dataclass

MODES = ("img2img", "txt2img")
# StreamDiffusion's cfg_type: "none" (no guidance batch; an LCM UNet still embeds its guidance scale), "self" (residual
# CFG with self-negative residual noise: N evaluations), "initialize" (residual CFG with one unconditional evaluation
# of the newest frame: N + 1), "full" (classifier-free guidance: 2N). Kim et al. 2023, StreamDiffusion, Sec. 3.3.
GUIDANCE_MODES = ("none", "self", "initialize", "full")
RESIDUAL_GUIDANCE = ("self", "initialize")
DEFAULT_CFG_SCALE = 1.2  # StreamDiffusion's prepare(guidance_scale=1.2)


@dataclass
class StreamConfig:
    """A stream's preparation. Changing `prompt`, `negative_prompt`, `steps` (same count), `guidance_scale` or
    `delta` later (Stream.update) keeps every captured graph; a new step count or size needs a new Stream."""

    prompt: str
    height: int = 512
    width: int = 512
    steps: tuple[int, ...] = (32, 45)  # indices into the LCM schedule of num_inference_steps, increasing
    num_inference_steps: int = 50
    mode: str = "img2img"
    guidance: str = "none"
    guidance_scale: float | None = None  # None: 1.2 for the CFG modes, the model's embedded default for an LCM UNet
    delta: float = 1.0  # residual CFG: the virtual residual noise's weight (StreamDiffusion's delta)
    negative_prompt: str = ""
    # One UNet batch per frame holding each in-flight frame at its own step: pictures come out len(steps) - 1 frames
    # late (the first frames return none; flush() drains the rest). False: every step of a frame runs in its call.
    stream_batch: bool = True
    # Frames per graph run (StreamDiffusion's frame_buffer_size): each stream-batch slot holds this many consecutive
    # frames, so one UNet batch serves them all; a frame's picture waits for the rest of its group (throughput for
    # latency). 1: every frame runs in its own call.
    frames_per_call: int = 1
    # Stochastic similarity filter: a frame whose cosine similarity to the last processed frame exceeds this is
    # likely skipped (StreamDiffusion: 0.98; None: off); at most max_skipped frames in a row are skipped.
    similarity_threshold: float | None = None
    max_skipped: int = 10
    seed: int = 0  # the stream's fixed noise, drawn once in the order the pipeline would draw it for this seed

    def __post_init__(self) -> None:
        self.steps = tuple(int(s) for s in self.steps)
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.guidance not in GUIDANCE_MODES:
            problems.append(f"guidance {self.guidance!r} is not one of {', '.join(GUIDANCE_MODES)}")
        problem = steps_problem(self.steps, self.num_inference_steps)
        if problem:
            problems.append(problem)
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            problems.append(f"guidance_scale {self.guidance_scale} must be a finite number >= 0")
        if not math.isfinite(self.delta):
            problems.append(f"delta {self.delta} must be finite")
        t = self.similarity_threshold
        if t is not None and not 0.0 < t <= 1.0:
            problems.append(f"similarity_threshold {t} must be in (0, 1] (None turns the filter off)")
        if not (isinstance(self.frames_per_call, int) and self.frames_per_call >= 1):
            problems.append(f"frames_per_call {self.frames_per_call!r} must be an integer >= 1")
        elif self.frames_per_call > 1 and t is not None:
            problems.append("the similarity filter decides frame by frame: use it with frames_per_call=1")
        if self.max_skipped < 0:
            problems.append(f"max_skipped {self.max_skipped} must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def delay(self) -> int:
        """Graph runs a picture comes out after its frame's: len(steps) - 1 with stream batch, else 0 (in frames:
        that times frames_per_call, plus the rest of the frame's group)."""
        return len(self.steps) - 1 if self.stream_batch else 0


def steps_problem(steps: tuple[int, ...], num_inference_steps: int) -> str | None:
    """What is wrong with a step-index list, or None."""
    if not steps:
        return "steps must name at least one step index"
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        return f"steps {list(steps)} must be strictly increasing"
    if steps[0] < 0 or steps[-1] >= num_inference_steps:
        return f"steps {list(steps)} must lie in [0, {num_inference_steps - 1}] for {num_inference_steps} steps"
    return None


def steps_for_strength(strength: float, count: int, num_inference_steps: int) -> tuple[int, ...]:
    """`count` step indices for an img2img strength in (0, 1]: the first at int((N - 1) * (1 - strength)), the rest
    evenly spaced up to N - 1 (StreamDiffusion's generate_t_index_list, linear mode)."""
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength {strength} must be in (0, 1]")
    last = num_inference_steps - 1
    first = int(last * (1 - strength))
    if count == 1:
        return (first,)
    if last - first < count - 1:
        lowest = math.ceil((count - 1) / last * 100) / 100
        raise ValueError(f"strength {strength} leaves {last - first + 1} of {num_inference_steps} steps for {count} "
                         f"step indices; raise it to >= {lowest:g}")  # fmt: skip
    interval = (last - first) / (count - 1)
    return tuple(first + int(i * interval) for i in range(count))
