"""`diffrt train lcm`: latent consistency distillation (Luo et al. 2023, https://arxiv.org/abs/2310.04378, Alg. 1)
of the trained UNet into a 1-4 step student, following diffusers' examples/consistency_distillation
(train_lcm_distill_sd_wds.py):

- teacher: the frozen UNet with classifier-free guidance at a random scale w in [w_min, w_max] (guidance 1 + w),
  unconditional branch = the encoded "" it was trained with;
- solver: one DDIM step over the skipping-step schedule of `ddim_steps` timesteps (k = 1000 / ddim_steps) from
  t_{n+k} to t_n;
- student: the teacher's UNet plus a w-embedding input (time_cond_proj_dim; its projection starts at zero, so the
  student starts as the teacher), parametrized with the consistency boundary condition
  f(x, t) = c_skip(t) x + c_out(t) x0(x, t), sigma_data = 0.5, timestep scaling 10 (what LCMScheduler assumes);
- target: an EMA of the student (decay 0.95) evaluated at the solver's output; pseudo-Huber loss (c = 0.001).
"""

import copy
import os

import numpy as np
import torch

from diffrt.loading import load_model
from diffrt.models.embeddings import guidance_scale_embedding
from diffrt.models.unet import UNet2DConditionModel, UNetConfig
from diffrt.schedules import SchedulerConfig, alphas_cumprod
from diffrt.tokenizer import CLIPTokenizer
from diffrt.train import checkpoint as ck
from diffrt.train.data import CaptionIds
from diffrt.train.export import read_component, save_component
from diffrt.train.recipes import LCM_TIME_COND_DIM, NOISE_SCHEDULE, StageSettings
from diffrt.train.unet import frozen, latent_batches, noised


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """Consistency-model c_skip, c_out: c_skip -> 1, c_out -> 0 as t -> 0 (LCM's, as LCMScheduler computes them)."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def ddim_schedule(ddim_steps: int, train_steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_n+k, t_n) pairs of the skipping-step DDIM solver: k-1, 2k-1, ... and each one's predecessor (0 first)."""
    k = train_steps // ddim_steps
    ts = np.arange(1, ddim_steps + 1) * k - 1
    return torch.from_numpy(ts), torch.from_numpy(np.concatenate([[0], ts[:-1]]))


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def student_unet(teacher: UNet2DConditionModel, config: dict) -> tuple[UNet2DConditionModel, dict]:
    """The teacher's weights in a UNet with a w-embedding input whose projection is zero."""
    config = {**config, "time_cond_proj_dim": LCM_TIME_COND_DIM}
    student = UNet2DConditionModel(UNetConfig.from_diffusers(config))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student, config


def train_lcm(run: str, s: StageSettings, device="cpu", workers=0, max_seconds=None, log=print, **kw) -> dict:
    x = s.extra
    vae = frozen(load_model(os.path.join(ck.finished_stage(run, "vae"), "model")), device)
    unet_dir = ck.finished_stage(run, "unet")
    teacher = frozen(load_model(os.path.join(unet_dir, "model")), device)
    text = frozen(load_model(os.path.join(unet_dir, "text_model")), device)
    caption_ids = CaptionIds(CLIPTokenizer.from_pretrained(os.path.join(run, "tokenizer")))
    torch.manual_seed(s.seed)
    teacher_config, _ = read_component(os.path.join(unet_dir, "model"))
    student, student_config = student_unet(teacher, teacher_config)
    student = student.to(device).train()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = ck.adamw(ck.param_groups((list(student.parameters()), s.lr)), device)
    ac = alphas_cumprod(SchedulerConfig(**NOISE_SCHEDULE)).to(device)
    starts, prevs = (t.to(device) for t in ddim_schedule(x["ddim_steps"], len(ac)))
    with torch.no_grad():
        uncond = text(caption_ids([""]).to(device)).last_hidden_state
    folder = os.path.join(run, "lcm")
    latents = latent_batches(run, "lcm", s, vae, device, workers)

    def step(i: int) -> dict:
        z, captions, gen = latents(i)
        n = len(captions)
        with torch.no_grad(), ck.autocast(device, s.precision):
            cond = text(caption_ids(captions).to(device, non_blocking=True)).last_hidden_state
        index = torch.randint(0, len(starts), (n,), generator=gen, device=device)
        t_start, t_prev = starts[index], prevs[index]
        noise = torch.randn(z.shape, generator=gen, device=device)
        w = x["w_min"] + (x["w_max"] - x["w_min"]) * torch.rand(n, generator=gen, device=device)
        w_emb = guidance_scale_embedding(w, LCM_TIME_COND_DIM)
        x_start = noised(z, t_start, noise, ac)
        a_start, a_prev = ac[t_start].view(-1, 1, 1, 1), ac[t_prev].view(-1, 1, 1, 1)
        c_skip_start, c_out_start = boundary_scalings(t_start)
        c_skip, c_out = boundary_scalings(t_prev)

        with ck.autocast(device, s.precision):
            eps = student(x_start, t_start, cond, timestep_cond=w_emb).float()
        pred = c_skip_start * x_start + c_out_start * x0_from_eps(x_start, eps, a_start)

        with torch.no_grad(), ck.autocast(device, s.precision):
            both = torch.cat([cond, uncond.expand(n, -1, -1)])
            eps_c, eps_u = teacher(x_start.repeat(2, 1, 1, 1), t_start.repeat(2), both).float().chunk(2)
            wv = w.view(-1, 1, 1, 1)
            eps_t = eps_c + wv * (eps_c - eps_u)  # guided epsilon; its x0 is the guided x0 (linear in eps)
            x_prev = a_prev.sqrt() * x0_from_eps(x_start, eps_t, a_start) + (1 - a_prev).sqrt() * eps_t
            eps_target = target(x_prev, t_prev, cond, timestep_cond=w_emb).float()
            goal = c_skip * x_prev + c_out * x0_from_eps(x_prev, eps_target, a_prev)

        c = x["huber_c"]
        loss = (torch.sqrt((pred - goal).square() + c * c) - c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ck.ema_update(target, student, x["ema_decay"])
        return {"loss": loss.detach()}

    result = ck.run_loop(folder, s.as_dict(), {"student": student, "target": target}, opt, step,
                         save_every=kw.get("save_every", 500), max_seconds=max_seconds, log=log)  # fmt: skip
    if result["done"]:
        save_component(os.path.join(folder, "model"), student_config, target.state_dict())
    return result
