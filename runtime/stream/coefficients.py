"""A stream's per-step numbers: computed on the host from the LCM schedule for its step indices, held on the device
in one table that a new strength refills in place (a captured graph reads the new values on its next replay).

The stream denoises as StreamDiffusion does, with LCM's consistency step at each picked timestep (Luo et al. 2023,
Alg. 3): the denoised estimate c_out * x0 + c_skip * x, then re-noised to the next picked step with fixed noise. On
the picked steps' schedule that is exactly diffrt's sample_lcm (tests/test_stream.py holds the two together).
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffrt.sampler_registry import SAMPLERS
from diffrt.samplers import X0Predictor, lcm_boundary_scalings
from diffrt.schedules import Schedule, SchedulerConfig

# One row per step; the last row's next_* are 1 (never used for a latent: that step's output is the picture), so
# that the residual-guidance update, computed for all rows at once, stays finite (StreamDiffusion does the same).
COLUMNS = ("timestep", "signal", "noise", "x0_from_x", "x0_from_out", "c_skip", "c_out", "next_signal", "next_noise")


def stream_schedule(config: SchedulerConfig, steps: tuple[int, ...], num_inference_steps: int) -> Schedule:
    """The LCM schedule of num_inference_steps steps restricted to the step indices."""
    full = SAMPLERS["lcm"].schedule(config, num_inference_steps)

    def pick(values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(values[i] for i in steps)

    return replace(full, timesteps=pick(full.timesteps), sigmas=(*pick(full.sigmas), full.sigmas[-1]),
                   signal=pick(full.signal), noise=pick(full.noise),
                   model_input_scale=pick(full.model_input_scale))  # fmt: skip


def coefficient_rows(schedule: Schedule, prediction_type: str) -> list[list[float]]:
    """COLUMNS for each step: the state's signal and noise levels, x0 from the model output (eps, v or x0, as
    diffrt.samplers.X0Predictor computes it), LCM's boundary scalings, and the next step's levels."""
    x0 = X0Predictor(lambda x, t: x, prediction_type, schedule).scalings  # (c_in, from_x, from_out) per step
    n, rows = len(schedule.timesteps), []
    for i, t in enumerate(schedule.timesteps):
        c_in, from_x, from_out = x0[i]
        assert c_in == 1.0, "LCM's schedule feeds the UNet the unscaled state"
        c_skip, c_out = lcm_boundary_scalings(t, schedule.timestep_scaling)
        following = (schedule.signal[i + 1], schedule.noise[i + 1]) if i + 1 < n else (1.0, 1.0)
        rows.append([t, schedule.signal[i], schedule.noise[i], from_x, from_out, c_skip, c_out, *following])
    return rows


@dataclass(frozen=True)
class StepCoefficients:
    """Views of the device table, one entry per step along dim 0: `timestep` [n], the rest [n, 1, 1, 1]."""

    timestep: Tensor
    signal: Tensor
    noise: Tensor
    x0_from_x: Tensor
    x0_from_out: Tensor
    c_skip: Tensor
    c_out: Tensor
    next_signal: Tensor
    next_noise: Tensor

    @classmethod
    def of(cls, table: Tensor) -> "StepCoefficients":
        n = table.shape[0]
        columns = {name: table[:, i].view(n, 1, 1, 1) for i, name in enumerate(COLUMNS)}
        columns["timestep"] = table[:, 0]
        return cls(**columns)

    def __getitem__(self, steps: slice) -> "StepCoefficients":
        return StepCoefficients(**{name: getattr(self, name)[steps] for name in COLUMNS})

    def repeated(self, frames: int) -> "StepCoefficients":
        """Each step's entry repeated for the `frames` consecutive frames its slot holds (a device op: in a captured
        graph it reads the table's current values)."""
        if frames == 1:
            return self
        return StepCoefficients(**{name: getattr(self, name).repeat_interleave(frames, 0) for name in COLUMNS})


def coefficient_table(rows: list[list[float]], device: torch.device) -> Tensor:
    """The rows as a float32 device tensor [n, len(COLUMNS)]."""
    return torch.tensor(rows, dtype=torch.float32).to(device)
