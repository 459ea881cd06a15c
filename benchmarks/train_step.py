"""Where a training step of the embedded model goes on a GPU: each part of the UNet stage's step timed alone (synced),
then whole steps back to back (no syncs inside), at several batch sizes; and the VAE stage's whole step. Random
weights of the `default` architecture: the cost does not depend on what the weights have learnt.

    python benchmarks/train_step.py --json step.json

If a whole step costs about the same at batch 256 and 1024, the step is bound by the host (kernel launches), and
the larger batch trains on 4x the samples per second for the same time.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment
from benchmarks.results_file import write_json
from diffrt.models.clip import CLIPTextConfig, CLIPTextModel
from diffrt.models.unet import UNet2DConditionModel, UNetConfig
from diffrt.models.vae import AutoencoderKL, AutoencoderKLConfig
from diffrt.schedules import SchedulerConfig, alphas_cumprod
from diffrt.train import checkpoint as ck
from diffrt.train.data import StepBatches, batches, to_model_input
from diffrt.train.recipes import ARCHITECTURES, NOISE_SCHEDULE, stage_settings
from diffrt.train.unet import diffusion_loss
from diffrt.train.vae import vae_loss

VOCAB = 603  # the default tokenizer's size; any value gives the same cost


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try the script at a small batch


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def ms_per_call(fn, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def unet_step_parts(batch: int, reps: int, workers: int) -> dict:
    arch, dev = ARCHITECTURES["default"], DEVICE
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(arch.vae)).to(dev).eval().requires_grad_(False)
    text = CLIPTextModel(CLIPTextConfig.from_transformers({**arch.text, "vocab_size": VOCAB})).to(dev)
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(arch.unet)).to(dev)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = ck.adamw(ck.param_groups((list(unet.parameters()), 2e-4), (list(text.parameters()), 2e-5)), dev)
    ac = alphas_cumprod(SchedulerConfig(**NOISE_SCHEDULE)).to(dev)
    data = batches(StepBatches(0, batch, arch.image_size), 0, 10**6, workers)
    images, _, _ = next(data)
    ids = torch.randint(0, VOCAB, (batch, 77), device=dev)
    gen = torch.Generator(dev).manual_seed(0)

    def encode():
        with torch.no_grad(), ck.autocast(dev, "bf16"):
            return vae.encode(to_model_input(images, dev)).sample(gen).float() * 0.2

    z = encode()

    def forward_backward():
        with ck.autocast(dev, "bf16"):
            context = text(ids).last_hidden_state
        diffusion_loss(unet, z, context, ac, gen, "bf16").backward()

    def update():
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        ck.ema_update(ema, unet, 0.999)

    def whole():
        nonlocal images
        images, _, _ = next(data)
        encode()
        forward_backward()
        update()
        opt.zero_grad(set_to_none=False)

    forward_backward()
    t0 = time.perf_counter()
    for _ in range(reps):
        next(data)
    data_ms = (time.perf_counter() - t0) / reps * 1e3
    return {
        "batch": batch,
        "data_next_ms": data_ms,
        "vae_encode_ms": ms_per_call(encode, reps),
        "text_unet_forward_backward_ms": ms_per_call(forward_backward, reps),
        "clip_adamw_ema_ms": ms_per_call(update, reps),
        "whole_step_ms": ms_per_call(whole, reps),
    }


def vae_step(batch: int, reps: int, workers: int) -> dict:
    arch, dev = ARCHITECTURES["default"], DEVICE
    vae = AutoencoderKL(AutoencoderKLConfig.from_diffusers(arch.vae)).to(dev)
    opt = ck.adamw(ck.param_groups((list(vae.parameters()), 2e-4)), dev, weight_decay=0.0)
    s = stage_settings("vae", precision="bf16")
    data = batches(StepBatches(0, batch, arch.image_size), 0, 10**6, workers)
    gen = torch.Generator(dev).manual_seed(0)

    def whole():
        images, _, _ = next(data)
        loss, _ = vae_loss(vae, to_model_input(images, dev), s, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()

    return {"batch": batch, "whole_step_ms": ms_per_call(whole, reps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet-batches", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--vae-batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--workers", type=int, default=15)
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    env = environment(args.commit)
    result = {"environment": env, "unet": [], "vae": []}
    for b in args.unet_batches:
        result["unet"].append({**env, **unet_step_parts(b, args.reps, args.workers)})  # every row names GPU, commit
        print(json.dumps(result["unet"][-1]), flush=True)
    for b in args.vae_batches:
        result["vae"].append({**env, **vae_step(b, args.reps, args.workers)})
        print(json.dumps(result["vae"][-1]), flush=True)
    if args.json:
        write_json(args.json, result, indent=2)


if __name__ == "__main__":
    main()
