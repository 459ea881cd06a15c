"""Every sampler diffrt runs, described once: its function, how its timesteps are placed, its defaults, its eta.

The pipeline, the request checks, the CLI and the server all read this table; nothing else lists samplers.
"""

import dataclasses
import functools
from dataclasses import dataclass

from diffrt import samplers as s
from diffrt.schedules import Schedule, SchedulerConfig, TimestepRule, check_choice
from diffrt.schedules import make_schedule as _make_schedule

LCM_GUIDANCE_DEFAULT = 8.5  # an LCM UNet's guidance embedding default (diffusers' LatentConsistencyModelPipeline)


@dataclass(frozen=True)
class Sampler:
    name: str
    sample: s.SampleFunction
    rule: TimestepRule
    default_steps: int
    few_step: bool  # made for distilled models: a few steps and no classifier-free guidance by default
    eta: float | None = None  # the default eta where the sampler takes one (its stochastic share), else None
    scheduler_classes: tuple[str, ...] = ()  # diffusers scheduler classes whose config implies this sampler

    @property
    def summary(self) -> str:
        return (self.sample.__doc__ or "").strip().splitlines()[0]

    def default_guidance(self, *, sdxl: bool, guidance_embedding: bool) -> float:
        """diffusers' pipeline defaults: an LCM UNet's embedded 8.5, no guidance for the other few-step samplers,
        7.5 for SD (5 for SDXL)."""
        if guidance_embedding:
            return LCM_GUIDANCE_DEFAULT
        if self.few_step:
            return 1.0
        return 5.0 if sdxl else 7.5

    def schedule(self, config: SchedulerConfig, steps: int) -> Schedule:
        return _cached_schedule(_config_key(config), self.name, steps)


_LCM = TimestepRule("lcm", "leading", end="denoised")
_SIGMA = TimestepRule("sigma", "linspace")
_DPM = TimestepRule("dpm", "linspace")
SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler("lcm", s.sample_lcm, _LCM, 4, True, scheduler_classes=("LCMScheduler",)),
        Sampler("tcd", s.sample_tcd, TimestepRule("lcm", "leading", end="t0"), 4, True, 0.3, ("TCDScheduler",)),
        Sampler("euler", s.sample_euler, _SIGMA, 25, False, scheduler_classes=("EulerDiscreteScheduler",)),
        # diffusers' EulerAncestralDiscreteScheduler has no Karras option.
        Sampler(
            "euler_a",
            s.sample_euler_ancestral,
            TimestepRule("sigma", "linspace", (("use_karras_sigmas", False),)),
            25,
            False,
            scheduler_classes=("EulerAncestralDiscreteScheduler",),
        ),  # fmt: skip
        # One step from t=999 (trailing), as SD-Turbo and SDXL-Turbo are run.
        Sampler(
            "turbo",
            s.sample_euler_ancestral,
            TimestepRule("sigma", "trailing", (("timestep_spacing", "trailing"), ("use_karras_sigmas", False))),
            1,
            True,
        ),  # fmt: skip
        Sampler("ddim", s.sample_ddim, TimestepRule("ddim", "leading"), 25, False, 0.0, ("DDIMScheduler",)),
        # Karras sigmas when the config's use_karras_sigmas is set.
        Sampler("dpmpp_2m", s.sample_dpmpp_2m, _DPM, 25, False, scheduler_classes=("DPMSolverMultistepScheduler",)),
        Sampler(
            "dpmpp_2m_karras",
            s.sample_dpmpp_2m,
            TimestepRule("dpm", "linspace", (("use_karras_sigmas", True),)),
            25,
            False,
        ),  # fmt: skip
    )
}
DEFAULT_SAMPLER = "euler"  # for a scheduler class that implies none of the above
ETA_SAMPLERS = tuple(name for name, sampler in SAMPLERS.items() if sampler.eta is not None)


def _config_key(config: SchedulerConfig) -> tuple:
    """A hashable copy of the config (trained_betas is a list); field by field, since dataclasses.asdict's deep copy
    cost 0.1 ms of every call's host time before its first launch."""
    fields = ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in fields)


@functools.lru_cache(maxsize=128)
def _cached_schedule(config_key: tuple, sampler: str, steps: int) -> Schedule:
    """Schedules are pure functions of (config, sampler, steps); a request plans one twice (check, then plan), and a
    server plans the same few over and over, so each is computed once (about 0.2 ms of host time each)."""
    config = SchedulerConfig(**{k: list(v) if k == "trained_betas" and v is not None else v for k, v in config_key})
    return _make_schedule(config, sampler, SAMPLERS[sampler].rule, steps)


def get_sampler(name: str) -> Sampler:
    check_choice("sampler", name, tuple(SAMPLERS))
    return SAMPLERS[name]


def sampler_for_scheduler(class_name: str) -> str:
    """The sampler a diffusers scheduler class implies."""
    return next((n for n, smp in SAMPLERS.items() if class_name in smp.scheduler_classes), DEFAULT_SAMPLER)


def make_schedule(config: SchedulerConfig, sampler: str, steps: int) -> Schedule:
    """The plan diffusers' scheduler for `sampler` makes with `set_timesteps(steps)` for this config."""
    return get_sampler(sampler).schedule(config, steps)
