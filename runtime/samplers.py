"""Samplers as flat functions sharing one signature (k-diffusion style):

    sample_x(model, x, schedule, noise=None, callback=None, **options) -> latents

`model` is an `X0Predictor` prepared for `schedule` (model output -> denoised estimate at step i), `x` the starting
state (`initial_latents` or `add_noise`), `schedule` a host-side plan (diffrt.sampler_registry's `make_schedule`,
optionally `truncate_for_strength`). Everything that depends only on the step count is computed before the loop;
the loop issues device work only (no `.item()`, no branching on tensor values, no host-to-device copies), so a
whole run can be captured in one CUDA graph. Fresh noise comes from `noise` (a `NoiseSource`) in diffusers' order,
so the same seed gives diffusers' result.
"""

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffrt.schedules import PREDICTION_TYPES, Schedule, check_choice

Scalings = tuple[float, float, float]  # (c_in, c_skip, c_out)
Callback = Callable[[int, Tensor, Tensor], None]  # (step index, state after the step, denoised estimate)
ModelOutput = Callable[[Tensor, Tensor], Tensor]  # (model input, timestep as a 0-d float32 tensor) -> raw output
SampleFunction = Callable[..., Tensor]  # the signature above


class NoiseSource:
    """N(0, 1) draws in a fixed order. With a generator they are drawn as diffusers' `randn_tensor` draws them: on
    the generator's device, then moved (a CPU generator reproduces diffusers' numbers on any device; one on the
    latents' device keeps the loop sync-free). Without one, torch's default generator of the target device."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        source = self.generator.device if self.generator is not None else device
        return torch.randn(shape, generator=self.generator, device=source, dtype=dtype).to(device)

    def like(self, x: Tensor) -> Tensor:
        return self(tuple(x.shape), x.dtype, x.device)


class X0Predictor:
    """x0 = c_skip * x + c_out * F(c_in * x, t) for a model predicting eps, v or x0 (Karras et al. 2022, eq. 7),
    prepared for one schedule: its per-step scalings (host floats) and timesteps (on `device`) are made here, before
    any loop, so that calling it issues device work only."""

    def __init__(
        self,
        model_output: ModelOutput | Sequence[ModelOutput],
        prediction_type: str,
        schedule: Schedule,
        device: torch.device | str = "cpu",
    ) -> None:
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        # CFG included; one for every step, or one per step (what runs at a step is decided on the host, e.g. a
        # ControlNet only between its guidance start and end)
        self.model_output = model_output
        self.prediction_type = prediction_type
        self.scalings = [
            self._scalings(*step)
            for step in zip(schedule.signal, schedule.noise, schedule.model_input_scale, strict=True)
        ]
        ts = torch.tensor(schedule.timesteps, dtype=torch.float32)
        device = torch.device(device)
        if device.type == "cuda":
            ts = ts.pin_memory().to(device, non_blocking=True)
        self.timesteps = ts.to(device)

    def _scalings(self, signal: float, noise: float, c_in: float) -> Scalings:
        """Host: the scalings for a state signal*x0 + noise*eps that the model sees multiplied by c_in."""
        if self.prediction_type == "sample":
            return c_in, 0.0, 1.0
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 on the unit-variance input
            return c_in, signal * c_in * c_in, -noise * c_in
        if signal == 0.0:
            raise ValueError(
                "an epsilon-prediction model cannot denoise at zero SNR (rescale_betas_zero_snr at t=999); "
                "zero-terminal-SNR schedules need a v_prediction model"
            )
        return c_in, 1.0 / signal, -noise / signal

    def __call__(self, x: Tensor, i: int) -> Tensor:
        """The denoised estimate at step i of the schedule."""
        c_in, c_skip, c_out = self.scalings[i]
        model_output = self.model_output if callable(self.model_output) else self.model_output[i]
        out = model_output(x * c_in if c_in != 1.0 else x, self.timesteps[i]).to(x.dtype)
        return out * c_out if c_skip == 0.0 else x * c_skip + out * c_out


def initial_latents(noise: Tensor, schedule: Schedule) -> Tensor:
    """txt2img start from N(0, 1) noise: diffusers' `latents * scheduler.init_noise_sigma`."""
    return noise * schedule.init_noise_sigma


def add_noise(latents: Tensor, noise: Tensor, schedule: Schedule) -> Tensor:
    """img2img start: the clean latents noised to the schedule's first step (diffusers' `scheduler.add_noise`)."""
    return latents * schedule.signal[0] + noise * schedule.noise[0]


def sample_euler(
    model: X0Predictor,
    x: Tensor,
    schedule: Schedule,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 2 without churn)."""
    s = schedule.sigmas
    for i in range(len(schedule.timesteps)):
        denoised = model(x, i)
        x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        _report(callback, i, x, denoised)
    return x


def sample_euler_ancestral(
    model: X0Predictor,
    x: Tensor,
    schedule: Schedule,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion, eta=1)."""
    s = schedule.sigmas
    # In float32 as diffusers: at zero-SNR's sigma = 4096 the step cancels ~3 digits, so rounding must agree.
    s32 = torch.tensor(s, dtype=torch.float32)
    up = torch.minimum((s32[1:] ** 2 * (s32[:-1] ** 2 - s32[1:] ** 2) / s32[:-1] ** 2) ** 0.5, s32[1:])
    down = ((s32[1:] ** 2 - up**2) ** 0.5).tolist()
    up = up.tolist()
    for i in range(len(schedule.timesteps)):
        denoised = model(x, i)
        x = x + (x - denoised) / s[i] * (down[i] - s[i])
        if s[i + 1] > 0:  # diffusers also draws (and multiplies by 0) after the last step; the result is the same
            x = x + _fresh(noise, x) * up[i]
        _report(callback, i, x, denoised)
    return x


def sample_ddim(
    model: X0Predictor,
    x: Tensor,
    schedule: Schedule,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    *,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta > 0 adds fresh noise each step. Steps land on t - T // steps as diffusers'
    DDIMScheduler does, even where the spacing puts the next timestep elsewhere (linspace/trailing, uneven counts)."""
    check_eta(eta)
    ac = schedule.alphas_cumprod
    stride = len(ac) // schedule.num_inference_steps
    plan = []
    for t in schedule.timesteps:
        a, prev = ac[int(t)], int(t) - stride
        a_prev = ac[prev] if prev >= 0 else schedule.final_alpha_cumprod
        std = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        plan.append((math.sqrt(a), math.sqrt(1 - a), math.sqrt(a_prev), math.sqrt(1 - a_prev - std * std), std))
    for i, (sa, sb, sa_prev, c_eps, std) in enumerate(plan):
        denoised = model(x, i)
        eps = (x - denoised * sa) / sb
        denoised = _clip(denoised, schedule.clip_sample_range)
        x = denoised * sa_prev + eps * c_eps
        if eta > 0:
            x = x + _fresh(noise, x) * std
        _report(callback, i, x, denoised)
    return x


def sample_lcm(
    model: X0Predictor,
    x: Tensor,
    schedule: Schedule,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 3): consistency estimate, then re-noise."""
    ac, n = schedule.alphas_cumprod, len(schedule.timesteps)
    plan = []
    for i, t in enumerate(schedule.timesteps):
        c_skip, c_out = lcm_boundary_scalings(t, schedule.timestep_scaling)
        a_next = ac[int(schedule.timesteps[i + 1])] if i + 1 < n else 1.0
        plan.append((c_skip, c_out, math.sqrt(a_next), math.sqrt(1 - a_next)))
    for i, (c_skip, c_out, sa_next, sb_next) in enumerate(plan):
        x0 = _clip(model(x, i), schedule.clip_sample_range)
        denoised = x0 * c_out + x * c_skip
        x = denoised * sa_next + _fresh(noise, x) * sb_next if i + 1 < n else denoised
        _report(callback, i, x, denoised)
    return x


def lcm_boundary_scalings(timestep: float, timestep_scaling: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency model's boundary condition at `timestep` (c_skip -> 1, c_out -> 0 as t -> 0),
    sigma_data = 0.5 (Song et al. 2023; diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
    scaled = timestep * timestep_scaling
    return 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)


def sample_tcd(
    model: X0Predictor,
    x: Tensor,
    schedule: Schedule,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    *,
    eta: float = 0.3,
) -> Tensor:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, eq. 14); eta is its
    gamma: each step goes to s = floor((1 - eta) * t_next) and is re-noised up to t_next (0: deterministic)."""
    check_eta(eta)
    ac, n = schedule.alphas_cumprod, len(schedule.timesteps)
    plan = []
    for i, t in enumerate(schedule.timesteps):
        t_next = int(schedule.timesteps[i + 1]) if i + 1 < n else 0
        s = int(torch.floor((1 - eta) * torch.tensor(t_next)))  # float32 as diffusers, so s matches at ties
        a, a_next, a_s = ac[int(t)], ac[t_next], ac[s]
        plan.append((math.sqrt(a), math.sqrt(1 - a), math.sqrt(a_s), math.sqrt(1 - a_s), a_next / a_s))
    for i, (sa, sb, sa_s, sb_s, ratio) in enumerate(plan):
        denoised = model(x, i)
        eps = (x - denoised * sa) / sb
        x = denoised * sa_s + eps * sb_s
        if eta > 0 and i + 1 < n:
            x = x * math.sqrt(ratio) + _fresh(noise, x) * math.sqrt(1 - ratio)
        _report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m(
    model: X0Predictor,
    x: Tensor,
    schedule: Schedule,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), first order on the first and last steps as diffusers does."""
    s, n = schedule.sigmas, len(schedule.timesteps)
    plan = []
    for i in range(n):
        alpha_t = 1.0 / math.sqrt(s[i + 1] ** 2 + 1.0)
        if s[i + 1] == 0.0:  # lambda_t = inf: the step lands on the denoised estimate
            plan.append((0.0, 1.0, 0.0))
            continue
        h = math.log(s[i] / s[i + 1])  # lambda = log(alpha / sigma_vp) = -log(sigma)
        a = s[i + 1] / s[i] * math.sqrt(s[i] ** 2 + 1.0) * alpha_t  # sigma_vp(t) / sigma_vp(s)
        b = -alpha_t * math.expm1(-h)
        c = 0.5 * b * h / math.log(s[i - 1] / s[i]) if i > 0 else 0.0  # 0.5 * b / r0, r0 = h_last / h
        plan.append((a, b, c))
    previous = None
    for i, (a, b, c) in enumerate(plan):
        denoised = model(x, i)
        x = x * a + denoised * b if c == 0.0 else x * a + denoised * b + (denoised - previous) * c
        previous = denoised
        _report(callback, i, x, denoised)
    return x


def check_eta(eta: float) -> None:
    """The one check of eta, for DDIM's stochastic share and TCD's gamma alike."""
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta {eta} must be in [0, 1] (0: deterministic)")


def _fresh(noise: NoiseSource | None, x: Tensor) -> Tensor:
    return (noise or NoiseSource()).like(x)


def _clip(x0: Tensor, limit: float | None) -> Tensor:
    return x0 if limit is None else x0.clamp(-limit, limit)


def _report(callback: Callback | None, i: int, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)
