"""Noise schedules and per-step plans from diffusers-style `scheduler_config.json` fields, computed on the host.

Everything here depends only on the config, the sampler's timestep rule and the step count. Values are computed
with the same float32 numpy/torch operations diffusers uses, so timesteps and sigmas equal diffusers' schedulers exactly
(tests/test_samplers.py). The device loop lives in diffrt.samplers.
"""

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class TimestepRule:
    """How a sampler's diffusers scheduler places its timesteps (diffrt.sampler_registry holds one per sampler)."""

    kind: str  # "lcm" (LCM/TCD picks), "ddim", "sigma" (Euler family), "dpm" (DPM-Solver)
    # The spacing diffusers' scheduler class defaults to when a config has no `timestep_spacing` (the SD 1.x config
    # has none: DDIMScheduler.from_config gives "leading", Euler "linspace").
    default_spacing: str
    overrides: tuple[tuple[str, object], ...] = ()  # config fields the sampler forces, as (name, value) pairs
    end: str = "next"  # "lcm"/"ddim" kinds: where the last step lands: "denoised" (LCM), "t0" (TCD), "next" (DDIM)


# Known diffusers keys whose non-default values would change the results in ways diffrt does not implement.
_UNSUPPORTED = {
    "thresholding": False,  # dynamic thresholding is for pixel-space models (Imagen, DeepFloyd IF)
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
}


@dataclass
class SchedulerConfig:
    """The diffusers scheduler fields diffrt honours; defaults are Stable Diffusion's, not diffusers' per-class ones."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: list[float] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: the sampler's diffusers class default (TimestepRule)
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = True  # DDIM only: the level after the last step is a=1 (else alphas_cumprod[0])
    original_inference_steps: int = 50  # LCM/TCD: the distillation schedule the steps are taken from
    timestep_scaling: float = 10.0  # LCM boundary condition c_skip/c_out
    use_karras_sigmas: bool = False  # Euler and dpmpp_2m (dpmpp_2m_karras forces it)
    clip_sample: bool = False  # DDIM/LCM: clamp x0 to +-clip_sample_range (diffusers' DDIM class defaults True)
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps {self.num_train_timesteps} must be >= 1")
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps {self.original_inference_steps} must be in [1, {self.num_train_timesteps}]"
            )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} values, expected {self.num_train_timesteps}")

    @classmethod
    def from_diffusers(cls, config: dict) -> "SchedulerConfig":
        """From a diffusers `scheduler_config.json` dict; unknown keys are ignored, null values mean the default."""
        for key, supported in _UNSUPPORTED.items():
            if config.get(key, supported) != supported:
                raise ValueError(
                    f"scheduler config sets {key}={config[key]!r}; diffrt supports only {supported!r} (edit the config)"
                )
        clipped = config.get("lambda_min_clipped")
        if clipped is not None and clipped != -math.inf:
            raise ValueError(f"scheduler config sets lambda_min_clipped={clipped!r}; diffrt supports only -inf")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known and v is not None})


@dataclass(frozen=True)
class Schedule:
    """A sampler's host-side plan for one run: n steps; the state at step i is signal[i]*x0 + noise[i]*eps."""

    sampler: str
    timesteps: tuple[float, ...]  # n: the UNet's timestep at each step
    sigmas: tuple[float, ...]  # n+1: noise level sqrt((1-a)/a) at each step, then that of the returned latents
    signal: tuple[float, ...]  # n
    noise: tuple[float, ...]  # n
    model_input_scale: tuple[float, ...]  # n: the UNet sees model_input_scale[i] * state (diffusers' scale_model_input)
    init_noise_sigma: float  # txt2img start: state = N(0, 1) * init_noise_sigma
    alphas_cumprod: tuple[float, ...]  # the training table a_t (DDIM/LCM/TCD step targets)
    final_alpha_cumprod: float  # DDIM's level past t=0
    num_inference_steps: int  # before strength truncation (DDIM steps back by num_train_timesteps // this)
    timestep_scaling: float
    clip_sample_range: float | None


def make_schedule(config: SchedulerConfig, sampler: str, rule: TimestepRule, steps: int) -> Schedule:
    """The plan diffusers' matching scheduler makes with `set_timesteps(steps)` for this config."""
    cfg = replace(config, **dict(rule.overrides))
    if cfg.timestep_spacing is None:
        cfg = replace(cfg, timestep_spacing=rule.default_spacing)
    if not isinstance(steps, int) or not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps {steps!r} must be an integer in [1, {cfg.num_train_timesteps}]")
    ac = alphas_cumprod(cfg)
    final = 1.0 if cfg.set_alpha_to_one else float(ac[0])
    common = {
        "sampler": sampler,
        "alphas_cumprod": tuple(ac.tolist()),
        "final_alpha_cumprod": final,
        "num_inference_steps": steps,
        "timestep_scaling": float(cfg.timestep_scaling),
        "clip_sample_range": float(cfg.clip_sample_range) if cfg.clip_sample else None,
    }
    if rule.kind in ("lcm", "ddim"):
        ts = _lcm_timesteps(cfg, steps) if rule.kind == "lcm" else _ddim_timesteps(cfg, steps)
        a = [float(ac[t]) for t in ts]
        if rule.end == "denoised":
            a_end = 1.0  # LCM returns its denoised estimate
        elif rule.end == "t0":
            a_end = float(ac[0])  # TCD's last step lands on t = 0
        else:
            t_prev = int(ts[-1]) - cfg.num_train_timesteps // steps
            a_end = float(ac[t_prev]) if t_prev >= 0 else final
        return Schedule(
            timesteps=tuple(float(t) for t in ts),
            sigmas=tuple(_vp_sigma(x) for x in [*a, a_end]),
            signal=tuple(math.sqrt(x) for x in a),
            noise=tuple(math.sqrt(1.0 - x) for x in a),
            model_input_scale=(1.0,) * len(ts),
            init_noise_sigma=1.0,
            **common,
        )
    if cfg.rescale_betas_zero_snr:
        ac = ac.clone()
        ac[-1] = 2**-24  # as diffusers' sigma-based schedulers: keeps the top sigma finite (4096)
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    if rule.kind == "sigma":
        ts, sigmas = _sigma_timesteps(cfg, steps, train_sigmas)
    else:
        ts, sigmas = _dpm_timesteps(cfg, steps, ac)
    s = [float(x) for x in sigmas[:-1]]
    if rule.kind == "sigma":  # Euler family: the state is x0 + sigma * eps; the UNet sees it / sqrt(sigma^2 + 1)
        top = torch.from_numpy(sigmas).max()
        init = top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
        signal, noise = [1.0] * len(s), s
        scale = [1.0 / math.sqrt(x * x + 1.0) for x in s]
    else:  # DPM-Solver: the state is alpha_t * x0 + sigma_t * eps with alpha_t = 1 / sqrt(sigma^2 + 1)
        init = 1.0
        signal = [1.0 / math.sqrt(x * x + 1.0) for x in s]
        noise = [x / math.sqrt(x * x + 1.0) for x in s]
        scale = [1.0] * len(s)
    return Schedule(
        timesteps=tuple(float(t) for t in ts),
        sigmas=tuple(float(x) for x in sigmas),
        signal=tuple(signal),
        noise=tuple(noise),
        model_input_scale=tuple(scale),
        init_noise_sigma=float(init),
        **common,
    )


def truncate_for_strength(schedule: Schedule, strength: float) -> Schedule:
    """img2img: keep the last int(n * strength) steps, as diffusers' img2img pipelines' `get_timesteps`."""
    n = len(schedule.timesteps)
    check_strength(strength, n)
    start = n - min(int(n * strength), n)
    return replace(
        schedule,
        timesteps=schedule.timesteps[start:],
        sigmas=schedule.sigmas[start:],
        signal=schedule.signal[start:],
        noise=schedule.noise[start:],
        model_input_scale=schedule.model_input_scale[start:],
    )


def alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """The training noise table a_t = prod(1 - beta) in float32, computed as diffusers does."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)], dtype=torch.float32)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(a_t) so a_T = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules ... Flawed", Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root -= last
    root *= first / (first - last)
    a = root**2
    return 1 - torch.cat([a[0:1], a[1:] / a[:-1]])


def _ddim_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1


def _lcm_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """`steps` evenly spaced (by index) picks from the distillation schedule k-1, 2k-1, ... (Luo et al. 2023)."""
    original = cfg.original_inference_steps
    if steps > original:
        raise ValueError(f"steps {steps} exceeds original_inference_steps {original}, the schedule LCM/TCD pick from")
    k = cfg.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]


def _sigma_timesteps(cfg: SchedulerConfig, steps: int, train_sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: float timesteps, sigmas interpolated in t."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float32) + cfg.steps_offset
    else:
        ts = np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    if cfg.use_karras_sigmas:
        sigmas = _karras(sigmas[-1].item(), sigmas[0].item(), steps)
        ts = np.array([_sigma_to_t(s, np.log(train_sigmas)) for s in sigmas])
    return ts.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _dpm_timesteps(cfg: SchedulerConfig, steps: int, ac: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler: integer timesteps; its own spacing rules (n + 1 points, last one dropped)."""
    n = cfg.num_train_timesteps
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    if cfg.use_karras_sigmas:  # Karras over the whole training range; t is the nearest training step
        sigmas = _karras(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
        ts = np.array([_sigma_to_t(s, np.log(train_sigmas)) for s in sigmas])
        # diffusers rounds, except for the cosine schedule, where its int64 cast truncates
        ts = ts.astype(np.int64) if cfg.beta_schedule == "squaredcos_cap_v2" else ts.round().astype(np.int64)
    else:
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = n // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        else:
            ts = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    return ts, np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training step with this sigma, interpolating log sigma linearly (k-diffusion, diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def check_strength(strength: float, steps: int) -> None:
    """The one check of an img2img strength: in (0, 1], and leaving at least one of `steps` to run."""
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength {strength} must be in (0, 1] (1 replaces the image entirely)")
    if int(steps * strength) < 1:  # img2img runs the last int(steps * strength) steps, as diffusers
        raise ValueError(
            f"strength {strength} with {steps} steps runs int({steps} * {strength}) = 0 steps; "
            f"raise strength to >= {math.ceil(100 / steps) / 100:g} or steps to >= {math.ceil(1 / strength)}"
        )


def _vp_sigma(a: float) -> float:
    return math.inf if a == 0.0 else math.sqrt((1.0 - a) / a)


def check_choice(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
