"""Samplers and schedules against diffusers' schedulers: timesteps/sigmas, full runs, img2img, errors, no host sync."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)

from diffrt.sampler_registry import SAMPLERS, make_schedule
from diffrt.samplers import NoiseSource, X0Predictor, add_noise, initial_latents
from diffrt.schedules import SchedulerConfig, truncate_for_strength
from tests.helpers.parity import max_rel_error

STEPS = (1, 2, 4, 8, 25)
DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# name -> (diffusers class, config overrides that make it our sampler, step() kwargs, our sampler kwargs)
REFERENCE = {
    "lcm": (LCMScheduler, {}, {}, {}),
    "tcd": (TCDScheduler, {}, {"eta": 0.3}, {"eta": 0.3}),
    "euler": (EulerDiscreteScheduler, {}, {}, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, {}, {}),
    "turbo": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, {}, {}),
    "ddim": (DDIMScheduler, {}, {}, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, DPM, {}, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**DPM, "use_karras_sigmas": True}, {}, {}),
}
assert set(REFERENCE) == set(SAMPLERS)

# Stable Diffusion 1.5's scheduler_config.json as shipped: no timestep_spacing, PNDM-only keys.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CONFIGS = {
    "sd15": SD15,
    "leading-v": {**SD15, "timestep_spacing": "leading", "prediction_type": "v_prediction"},
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "trailing": {**SD15, "timestep_spacing": "trailing", "steps_offset": 0},
    "zero-snr-v": {
        **SD15,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
    },
    "linear-betas": {
        **SD15,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "set_alpha_to_one": True,
    },
    "cosine-karras": {**SD15, "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True},
    "clipped": {**SD15, "clip_sample": True, "clip_sample_range": 0.5},  # DDIM and LCM clip x0; the others ignore it
    "lcm-100": {**SD15, "original_inference_steps": 100, "timestep_scaling": 5.0, "prediction_type": "sample"},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: intra-op threads only add overhead (10 ms per conv on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(name: str, config: dict):
    cls, overrides, step_kwargs, ours = REFERENCE[name]
    return cls.from_config({**config, **overrides}), step_kwargs, ours


def stand_in_model(seed: int = 0):
    """A fixed deterministic 'UNet': a random near-identity channel mix of the latents plus a function of t."""
    g = torch.Generator().manual_seed(seed)
    mix = 0.9 * torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g)
    bias = torch.randn(1, 4, 8, 8, generator=g)

    def unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, mix[:, :, None, None]) + 0.1 * torch.cos(torch.as_tensor(t).float() / 300.0) * bias

    return unet


def run_diffusers(scheduler, steps, unet, noise, generator, step_kwargs, image=None, strength=1.0):
    """The loop of diffusers' StableDiffusion(Img2Img)Pipeline around scheduler.step(); returns every state."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if image is None:
        x = noise * scheduler.init_noise_sigma
        if hasattr(scheduler, "set_begin_index"):  # else diffusers' lookup of the first t skips a step on duplicates
            scheduler.set_begin_index(0)
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        x = scheduler.add_noise(image, noise, timesteps[:1].repeat(noise.shape[0]))
    states = [x]
    for t in timesteps:
        out = unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
        states.append(x)
    return timesteps, states


def run_ours(name, config, steps, unet, noise, generator, kwargs, image=None, strength=1.0):
    schedule = make_schedule(config, name, steps)
    if image is None:
        x = initial_latents(noise, schedule)
    else:
        schedule = truncate_for_strength(schedule, strength)
        x = add_noise(image, noise, schedule)
    states = [x]
    model = X0Predictor(unet, config.prediction_type, schedule)
    out = SAMPLERS[name].sample(model, x, schedule, NoiseSource(generator), lambda i, x, d: states.append(x), **kwargs)
    assert out is states[-1]
    return schedule, states


def assert_states_match(ours, theirs, what):
    assert len(ours) == len(theirs), f"{what}: {len(ours)} states vs diffusers' {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        err = max_rel_error(a, b)
        assert err <= 1e-5, f"{what}: state {i} max relative error {err:.2e} > 1e-5"


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_schedule_matches_diffusers(name, config_name):
    config = SchedulerConfig.from_diffusers(CONFIGS[config_name])
    for steps in STEPS:
        if steps > config.original_inference_steps:
            continue
        ref, _, _ = reference(name, CONFIGS[config_name])
        ref.set_timesteps(steps)
        ours = make_schedule(config, name, steps)
        what = f"{name}/{config_name}/{steps} steps"
        assert list(ours.timesteps) == ref.timesteps.float().tolist(), what
        assert ours.init_noise_sigma == float(ref.init_noise_sigma), what
        if hasattr(ref, "sigmas"):  # Euler family and DPM-Solver: sigma schedules, bit for bit
            assert list(ours.sigmas) == ref.sigmas.tolist(), what
        else:  # DDIM / LCM / TCD: the noise level at each timestep, from diffusers' alphas_cumprod table
            a = ref.alphas_cumprod[ref.timesteps]
            torch.testing.assert_close(torch.tensor(ours.signal, dtype=torch.float32), a.sqrt(), msg=what)
            torch.testing.assert_close(torch.tensor(ours.noise, dtype=torch.float32), (1 - a).sqrt(), msg=what)


# Where diffusers cannot be the reference; the test checks that it does fail there, and that diffrt stays finite.
DIFFUSERS_FAILS = {
    ("euler_a", "lcm-100"): "EulerAncestralDiscreteScheduler raises NotImplementedError for prediction_type 'sample'",
    ("turbo", "lcm-100"): "EulerAncestralDiscreteScheduler raises NotImplementedError for prediction_type 'sample'",
    ("euler_a", "cosine-karras"): "at sigma 2e4 its float32 sigma_up exceeds sigma_next: sqrt of a negative, NaN",
}


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_run_matches_diffusers(name, config_name):
    """Same noise, same seeded generator, same stand-in model: every state of the run within 1e-5 (fp32, CPU)."""
    config = SchedulerConfig.from_diffusers(CONFIGS[config_name])
    unet = stand_in_model()
    diffusers_failed = False
    for steps in STEPS:
        if steps > config.original_inference_steps:
            continue
        ref, step_kwargs, kwargs = reference(name, CONFIGS[config_name])
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        _, ours = run_ours(name, config, steps, unet, noise, torch.Generator().manual_seed(7), kwargs)
        what = f"{name}/{config_name}/{steps} steps"
        assert torch.isfinite(ours[-1]).all(), what
        try:
            _, theirs = run_diffusers(ref, steps, unet, noise, torch.Generator().manual_seed(7), step_kwargs)
        except NotImplementedError:
            assert (name, config_name) in DIFFUSERS_FAILS, what
            diffusers_failed = True
            continue
        if (name, config_name) in DIFFUSERS_FAILS and not torch.isfinite(theirs[-1]).all():
            diffusers_failed = True
            continue
        assert_states_match(ours, theirs, what)
    assert diffusers_failed == ((name, config_name) in DIFFUSERS_FAILS), "DIFFUSERS_FAILS is out of date"


@pytest.mark.parametrize(("name", "eta"), [("ddim", 0.5), ("ddim", 1.0), ("tcd", 0.0), ("tcd", 0.7)])
def test_run_matches_diffusers_with_eta(name, eta):
    config = SchedulerConfig.from_diffusers(CONFIGS["sd15"])
    unet = stand_in_model(1)
    for steps in (2, 4, 25):
        ref, _, _ = reference(name, CONFIGS["sd15"])
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        _, theirs = run_diffusers(ref, steps, unet, noise, torch.Generator().manual_seed(3), {"eta": eta})
        _, ours = run_ours(name, config, steps, unet, noise, torch.Generator().manual_seed(3), {"eta": eta})
        assert_states_match(ours, theirs, f"{name}/eta={eta}/{steps} steps")


@pytest.mark.parametrize("config_name", ["sd15", "zero-snr-v"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_matches_diffusers(name, config_name):
    """Strength truncation (diffusers' get_timesteps), add_noise at the first kept step, and the run from there."""
    config = SchedulerConfig.from_diffusers(CONFIGS[config_name])
    unet = stand_in_model(2)
    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    for steps, strength in [(4, 0.5), (4, 1.0), (8, 0.3), (25, 0.75), (25, 0.04)]:
        ref, step_kwargs, kwargs = reference(name, CONFIGS[config_name])
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
        gen = torch.Generator().manual_seed(5)
        ts, theirs = run_diffusers(ref, steps, unet, noise, gen, step_kwargs, image, strength)
        gen = torch.Generator().manual_seed(5)
        schedule, ours = run_ours(name, config, steps, unet, noise, gen, kwargs, image, strength)
        what = f"{name}/{config_name}/{steps} steps/strength {strength}"
        assert list(schedule.timesteps) == ts.float().tolist(), what
        assert_states_match(ours, theirs, what)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m", "turbo", "lcm"])
def test_one_trailing_step_is_t999(name):
    config = SchedulerConfig.from_diffusers({**SD15, "timestep_spacing": "trailing"})
    assert make_schedule(config, name, 1).timesteps == (999.0,)


def test_turbo_is_one_step_from_t999_whatever_the_config_spacing():
    config = SchedulerConfig.from_diffusers(SD15)  # no spacing: euler_a takes diffusers' linspace, one step at t=0
    schedule = make_schedule(config, "turbo", 1)
    assert schedule.timesteps == (999.0,) and schedule.sigmas[-1] == 0.0
    assert make_schedule(config, "euler_a", 1).timesteps == (0.0,)
    # One step: Euler ancestral adds no noise, so it equals diffusers' deterministic Euler (SD-Turbo's scheduler).
    unet, noise = stand_in_model(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    euler = EulerDiscreteScheduler.from_config({**SD15, "timestep_spacing": "trailing"})
    _, theirs = run_diffusers(euler, 1, unet, noise, None, {})
    _, ours = run_ours("turbo", config, 1, unet, noise, torch.Generator().manual_seed(1), {})
    assert_states_match(ours, theirs, "turbo vs Euler, 1 step")


def test_config_from_diffusers_ignores_unknown_keys_and_keeps_fields():
    config = SchedulerConfig.from_diffusers(
        {
            **SD15,
            "_class_name": "LCMScheduler",
            "skip_prk_steps": True,
            "some_future_key": [1, 2],
            "use_karras_sigmas": None,
        }
    )
    assert (config.steps_offset, config.set_alpha_to_one, config.timestep_spacing) == (1, False, None)
    assert config.use_karras_sigmas is False and config.beta_schedule == "scaled_linear"
    assert make_schedule(config, "ddim", 4).timesteps == (751.0, 501.0, 251.0, 1.0)  # DDIM default: leading
    assert make_schedule(config, "euler", 4).timesteps[-1] == 0.0  # Euler default: linspace


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"beta_schedule": "cosine"}, "unknown beta_schedule 'cosine'; choose one of: scaled_linear, linear"),
        ({"timestep_spacing": "even"}, "unknown timestep_spacing 'even'; choose one of: leading, linspace, trailing"),
        ({"prediction_type": "flow"}, "unknown prediction_type 'flow'"),
        ({"thresholding": True}, "thresholding=True; diffrt supports only False"),
        ({"interpolation_type": "log_linear"}, "interpolation_type='log_linear'; diffrt supports only 'linear'"),
        ({"lambda_min_clipped": -5.1}, "lambda_min_clipped=-5.1"),
        ({"original_inference_steps": 2000}, "original_inference_steps 2000 must be in [1, 1000]"),
    ],
)
def test_bad_config_values_are_named(config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        SchedulerConfig.from_diffusers({**SD15, **config})


def test_actionable_errors():
    config = SchedulerConfig.from_diffusers(SD15)
    with pytest.raises(ValueError, match="unknown sampler 'heun'; choose one of: lcm, tcd, euler, euler_a, turbo"):
        make_schedule(config, "heun", 4)
    with pytest.raises(ValueError, match=r"steps 0 must be an integer in \[1, 1000\]"):
        make_schedule(config, "euler", 0)
    with pytest.raises(ValueError, match="steps 60 exceeds original_inference_steps 50"):
        make_schedule(config, "lcm", 60)
    schedule = make_schedule(config, "euler", 4)
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"strength {strength} must be in \(0, 1\]"):
            truncate_for_strength(schedule, strength)
    with pytest.raises(ValueError, match=r"runs int\(4 \* 0.2\) = 0 steps; raise strength to >= 0.25 or steps to >= 5"):
        truncate_for_strength(schedule, 0.2)
    with pytest.raises(ValueError, match="unknown prediction_type 'eps'"):
        X0Predictor(stand_in_model(), "eps", schedule)
    zero_snr_eps = SchedulerConfig.from_diffusers({**CONFIGS["zero-snr-v"], "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="epsilon-prediction model cannot denoise at zero SNR"):
        X0Predictor(stand_in_model(), "epsilon", make_schedule(zero_snr_eps, "ddim", 2))
    tcd = make_schedule(config, "tcd", 2)
    with pytest.raises(ValueError, match=r"eta 1.5 must be in \[0, 1\]"):
        SAMPLERS["tcd"].sample(X0Predictor(stand_in_model(), "epsilon", tcd), torch.zeros(1, 4, 8, 8), tcd, eta=1.5)


@pytest.mark.parametrize("name", SAMPLERS)
def test_loop_never_reads_tensor_values(name):
    """On the meta device tensors have no data: any .item(), bool(tensor) or data-dependent branch would raise."""
    config = SchedulerConfig.from_diffusers(CONFIGS["leading-v"])
    mix = torch.randn(4, 4, device="meta")
    calls = []

    def unet(x, t):
        calls.append(t.device)
        return F.conv2d(x, mix[:, :, None, None]) * torch.cos(t)

    x = torch.empty(2, 4, 8, 8, device="meta")
    schedule = make_schedule(config, name, 8)
    out = SAMPLERS[name].sample(X0Predictor(unet, "v_prediction", schedule, "meta"), x, schedule, None, None)
    assert out.device.type == "meta" and out.shape == x.shape and len(calls) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", SAMPLERS)
def test_loop_has_no_host_sync_on_cuda(name):
    """With the generator on the GPU, a whole run issues no synchronizing CUDA call (sync debug mode raises)."""
    config = SchedulerConfig.from_diffusers(CONFIGS["sd15"])
    mix = 0.9 * torch.eye(4, device="cuda")

    def unet(x, t):
        return F.conv2d(x, mix[:, :, None, None]) + torch.cos(t)

    generator = torch.Generator("cuda").manual_seed(0)
    schedule = make_schedule(config, name, 8)
    x = initial_latents(torch.randn(2, 4, 64, 64, device="cuda", generator=generator), schedule)
    model = X0Predictor(unet, "epsilon", schedule, "cuda")  # the host plan: timesteps copied to the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = SAMPLERS[name].sample(model, x, schedule, NoiseSource(generator))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_karras_sigmas_are_karras():
    """dpmpp_2m_karras: sigma^(1/7) evenly spaced from the top training sigma to the bottom one, then 0."""
    schedule = make_schedule(SchedulerConfig(), "dpmpp_2m_karras", 8)
    roots = [s ** (1 / 7) for s in schedule.sigmas[:-1]]
    gaps = [a - b for a, b in itertools.pairwise(roots)]
    assert max(gaps) - min(gaps) < 1e-5 * roots[0] and schedule.sigmas[-1] == 0.0
    assert math.isclose(schedule.sigmas[0], 14.6146, rel_tol=1e-4)
