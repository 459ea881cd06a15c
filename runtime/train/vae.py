"""`diffrt train vae`: the KL autoencoder (f=8, 4 latent channels), trained as latent diffusion's first stage with
an L1 + L2 reconstruction loss and a small KL term (Rombach et al. 2022, Sec. 3 and App. G; their LPIPS and GAN terms
are left out: the flat-colored shapes need no perceptual detail).

When training ends, the scaling factor is measured as SD's was: 1 / std of the posterior samples (0.18215 for SD),
so the UNet's latents have unit variance, and written into the exported config.
"""

import os

import torch
import torch.nn.functional as F

from diffrt.models.vae import AutoencoderKL, AutoencoderKLConfig
from diffrt.train import checkpoint as ck
from diffrt.train.data import StepBatches, batches, to_model_input
from diffrt.train.export import save_component
from diffrt.train.recipes import StageSettings, read_run

SCALING_SAMPLES = 1024  # images whose latents set the scaling factor (seeds no training batch uses)
RECONSTRUCTION_CHECK = 1000  # fresh images whose reconstructions the judge reads (the ceiling on adherence)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch (LDM's DiagonalGaussian.kl)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, s: StageSettings, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """L1 + l2_weight * L2 of the reconstruction through a posterior sample, + kl_weight * KL."""
    with ck.autocast(x.device, s.precision):
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(gen)).float()
    l1, l2 = F.l1_loss(recon, x), F.mse_loss(recon, x)
    kl = kl_loss(posterior.mean.float(), posterior.logvar.float())
    loss = l1 + s.extra["l2_weight"] * l2 + s.extra["kl_weight"] * kl
    return loss, {"loss": loss.detach(), "l1": l1.detach(), "kl": kl.detach()}


@torch.no_grad()
def measure_scaling(vae: AutoencoderKL, s: StageSettings, size: int, device) -> float:
    data = StepBatches(s.seed + 1, 256, size)
    gen = ck.step_generator(s.seed, -1, device)
    zs = [vae.encode(to_model_input(data[i][0], device)).sample(gen) for i in range(SCALING_SAMPLES // data.batch)]
    return float(1.0 / torch.cat(zs).float().std())


@torch.no_grad()
def judge_reconstructions(vae: AutoencoderKL, size: int, device, count: int = RECONSTRUCTION_CHECK) -> float:
    """The judge's all-attributes accuracy on reconstructions of fresh images (held-out pairs included): what the
    VAE preserves bounds what any UNet on its latents can show, so this is adherence's ceiling."""
    from diffrt.train import judge as judge_lib
    from diffrt.train import shapes

    judge = judge_lib.load_judge(device=device)
    seeds = range(judge_lib.EVAL_SEED_START, judge_lib.EVAL_SEED_START + count)
    images, _, labels = shapes.batch(seeds, size, "all")
    recon = []
    for lo in range(0, count, 250):
        x = to_model_input(torch.from_numpy(images[lo : lo + 250]).permute(0, 3, 1, 2), device)
        recon.append((vae.decode(vae.encode(x).mean).float() / 2 + 0.5).clamp(0, 1))
    predicted = judge.predict(torch.cat(recon))
    return float((predicted == labels).all(axis=1).mean())


def train_vae(run: str, s: StageSettings, device="cpu", workers=0, max_seconds=None, log=print, **kw) -> dict:
    arch = read_run(run)
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(arch.vae)).to(device)
    opt = ck.adamw(ck.param_groups((list(vae.parameters()), s.lr)), device, weight_decay=0.0)
    folder = os.path.join(run, "vae")
    state = ck.read_state(folder)
    data = batches(StepBatches(s.seed, s.batch, arch.image_size), state["step"] if state else 0, s.steps, workers)

    def step(i: int) -> dict:
        images, _, _ = next(data)
        loss, metrics = vae_loss(vae, to_model_input(images, device), s, ck.step_generator(s.seed, i, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return metrics

    result = ck.run_loop(folder, s.as_dict(), {"vae": vae}, opt, step, save_every=kw.get("save_every", 1000),
                         max_seconds=max_seconds, log=log)  # fmt: skip
    if result["done"]:
        vae.eval()
        scaling = measure_scaling(vae, s, arch.image_size, device)
        log(f"scaling_factor {scaling:.5f}")
        save_component(os.path.join(folder, "model"), {**arch.vae, "scaling_factor": scaling}, vae.state_dict())
        accuracy = judge_reconstructions(vae, arch.image_size, device)
        log(f"judge accuracy on {RECONSTRUCTION_CHECK} reconstructions: {accuracy:.4f} (all attributes right)")
        ck.atomic_write_json({"scaling_factor": scaling, "judge_accuracy_on_reconstructions": accuracy},
                             os.path.join(folder, "report.json"))  # fmt: skip
    return result
