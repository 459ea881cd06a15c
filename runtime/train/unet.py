"""`diffrt train unet`: the SD-family UNet trained as Stable Diffusion is (Rombach et al. 2022): latents of the
frozen VAE times its scaling factor, epsilon prediction with an MSE loss at uniform timesteps of the scaled-linear
beta schedule, and 10% of captions replaced by "" so that one model gives both terms of classifier-free guidance
(Ho & Salimans 2022). The text encoder from `diffrt train text` is fine-tuned jointly at a lower learning rate (SD
kept CLIP frozen; ours is small and pretrained only on labels, so it is allowed to adapt). EMA copies of both are
what downstream stages and the export use.
"""

import copy
import os

import torch
import torch.nn.functional as F

from diffrt.loading import load_model
from diffrt.models.unet import UNet2DConditionModel, UNetConfig
from diffrt.schedules import SchedulerConfig, alphas_cumprod
from diffrt.tokenizer import CLIPTokenizer
from diffrt.train import checkpoint as ck
from diffrt.train.data import CaptionIds, StepBatches, batches, to_model_input
from diffrt.train.export import read_component, save_component
from diffrt.train.recipes import NOISE_SCHEDULE, StageSettings, read_run


def frozen(module: torch.nn.Module, device) -> torch.nn.Module:
    return module.to(device).eval().requires_grad_(False)


def ema_decay(step: int, decay: float) -> float:
    """diffusers' EMAModel warm-up: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace a share p of captions by "" (the draws come from a CPU generator: reading GPU draws back would sync)."""
    drop = torch.rand(len(captions), generator=generator).tolist()
    return ["" if d < p else c for c, d in zip(captions, drop, strict=True)]


def noised(z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0): sqrt(a_t) z + sqrt(1 - a_t) eps (DDPM, Ho et al. 2020, eq. 4)."""
    a = ac[t].view(-1, 1, 1, 1)
    return a.sqrt() * z + (1 - a).sqrt() * noise


def latent_batches(run: str, stage: str, s: StageSettings, vae: torch.nn.Module, device, workers: int):
    """Step i's batch as (latents of the frozen VAE, a posterior sample times its scaling factor; captions; the step's
    generator, which drew that sample), starting at the stage's saved step so that a resumed run sees the same."""
    state = ck.read_state(os.path.join(run, stage))
    data = batches(StepBatches(s.seed, s.batch, read_run(run).image_size), state["step"] if state else 0, s.steps,
                   workers)  # fmt: skip
    scaling = vae.config.scaling_factor

    def batch(i: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
        images, captions, _ = next(data)
        gen = ck.step_generator(s.seed, i, device)
        with torch.no_grad(), ck.autocast(device, s.precision):
            z = vae.encode(to_model_input(images, device)).sample(gen).float() * scaling
        return z, captions, gen

    return batch


def diffusion_loss(
    unet: torch.nn.Module,
    z: torch.Tensor,
    context: torch.Tensor,
    ac: torch.Tensor,
    gen: torch.Generator,
    precision: str,
) -> torch.Tensor:
    """SD's objective: || eps - unet(z_t, t, context) ||^2 at t ~ U{0..T-1} (Ho et al. 2020, eq. 14)."""
    noise = torch.randn(z.shape, generator=gen, device=z.device)
    t = torch.randint(0, len(ac), (z.shape[0],), generator=gen, device=z.device)
    with ck.autocast(z.device, precision):
        pred = unet(noised(z, t, noise, ac), t, context)
    return F.mse_loss(pred.float(), noise)


def train_unet(run: str, s: StageSettings, device="cpu", workers=0, max_seconds=None, log=print, **kw) -> dict:
    arch = read_run(run)
    vae = frozen(load_model(os.path.join(ck.finished_stage(run, "vae"), "model")), device)
    text = load_model(os.path.join(ck.finished_stage(run, "text"), "model")).to(device).train()
    caption_ids = CaptionIds(CLIPTokenizer.from_pretrained(os.path.join(run, "tokenizer")))
    torch.manual_seed(s.seed)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(arch.unet)).to(device)
    unet_ema, text_ema = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    ac = alphas_cumprod(SchedulerConfig(**NOISE_SCHEDULE)).to(device)
    groups = ck.param_groups((list(unet.parameters()), s.lr), (list(text.parameters()), s.extra["text_lr"]))
    text.requires_grad_(s.extra["text_lr"] > 0)
    opt = ck.adamw(groups, device)
    modules = {"unet": unet, "text_encoder": text, "unet_ema": unet_ema, "text_encoder_ema": text_ema}
    folder = os.path.join(run, "unet")
    latents = latent_batches(run, "unet", s, vae, device, workers)

    def step(i: int) -> dict:
        z, captions, gen = latents(i)
        dropped = drop_captions(captions, s.extra["caption_dropout"], ck.step_generator(s.seed, i, stream=1))
        ids = caption_ids(dropped).to(device, non_blocking=True)
        with ck.autocast(device, s.precision):
            context = text(ids).last_hidden_state
        loss = diffusion_loss(unet, z, context, ac, gen, s.precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        decay = ema_decay(i, s.extra["ema_decay"])
        ck.ema_update(unet_ema, unet, decay)
        ck.ema_update(text_ema, text, decay)
        return {"loss": loss.detach()}

    result = ck.run_loop(folder, s.as_dict(), modules, opt, step, save_every=kw.get("save_every", 1000),
                         max_seconds=max_seconds, log=log)  # fmt: skip
    if result["done"]:
        save_component(os.path.join(folder, "model"), arch.unet, unet_ema.state_dict())
        text_config, _ = read_component(os.path.join(run, "text", "model"))
        save_component(os.path.join(folder, "text_model"), text_config, text_ema.state_dict())
    return result
