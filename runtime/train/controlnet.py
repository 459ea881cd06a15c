"""`diffrt train controlnet`: a ControlNet (Zhang et al. 2023) for the embedded default model, trained on the shapes
dataset with the shape mask as its control image, so that the mask fixes where and how big the shapes are while the
prompt still says their colors and kinds; and its evaluation.

The mask is the sample's own geometry: the same labels and the same placement draws rendered white on black
(`control_sample`), so image, caption and mask agree exactly. Recipe (the ControlNet paper's, for this model): the
ControlNet starts as a copy of the frozen UNet's encoder with zero output convs; the loss is the UNet's own epsilon
MSE at uniform timesteps, with the UNet, VAE and text encoder frozen and only the ControlNet trained. The shipped
UNet is the LCM student (the teacher is not shipped), so it is given a guidance embedding w ~ U[w_min, w_max] as in
its distillation; the ControlNet then learns the residuals that pull its estimate to the masked geometry.

Evaluation (`evaluate_controlnet`): fresh control samples (seeds no stage trains on) generate through the pipeline
with the ControlNet (LCM 4 steps by default); the generated shapes' mask is the set of pixels nearer in color to one
of the prompt's shape colors than to its background; IoU with the control mask, and the judge's adherence to the
prompt, are reported, beside the IoU of the same prompts and noise without the ControlNet.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from diffrt.loading import load_model
from diffrt.models.controlnet import controlnet_from_unet
from diffrt.models.embeddings import guidance_scale_embedding
from diffrt.schedules import SchedulerConfig, alphas_cumprod
from diffrt.tokenizer import CLIPTokenizer
from diffrt.train import checkpoint as ck
from diffrt.train import shapes
from diffrt.train.data import SEED_STRIDE, CaptionIds, batches, to_model_input
from diffrt.train.export import save_component
from diffrt.train.recipes import NOISE_SCHEDULE, StageSettings
from diffrt.train.unet import frozen, noised

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_model")
HINT_CHANNELS = (16, 32, 64, 128)  # three stride-2 convs: the control image at 8x the latents' size
EVAL_SEED_START = 4 * 10**9  # beyond the judge's (10**9), the adherence benchmark's (2e9) and the tests' (3e9)


def control_sample(seed: int, size: int = 64, split: str = "train") -> tuple[np.ndarray, np.ndarray, shapes.Labels]:
    """(image uint8 [S, S, 3], control mask uint8 [S, S, 3]: the shapes white on black, labels) of one dataset seed:
    the mask is drawn from the same placement draws as the image (shapes.sample's own rng, replayed)."""
    rng = shapes._rng(seed)  # shapes.sample's own generator: the image is shapes.sample(seed)'s
    labels = shapes.draw_labels(rng, split)
    state = rng.getstate()
    image = shapes.render(labels, rng, size)
    rng.setstate(state)
    white = shapes.Labels(labels.layout, ("white",) * labels.count, labels.shapes, "black", labels.size)
    mask = shapes.render(white, rng, size).astype(np.float32)
    lo, hi = shapes.PALETTE["black"][0], shapes.PALETTE["white"][0]
    mask = np.clip((mask - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    return image, mask, labels


class ControlBatches(Dataset):
    """Item `step` = that step's (images uint8 [B, 3, S, S], masks uint8 [B, 3, S, S], captions); seeds as
    diffrt.train.data.StepBatches draws them, so a resumed run sees the same batches."""

    def __init__(self, seed: int, batch: int, size: int, split: str = "train"):
        self.base, self.batch, self.size, self.split = seed * SEED_STRIDE, batch, size, split

    def __len__(self) -> int:
        return SEED_STRIDE // self.batch

    def __getitem__(self, step: int):
        first = self.base + step * self.batch
        samples = [control_sample(s, self.size, self.split) for s in range(first, first + self.batch)]
        images = np.stack([s[0] for s in samples]).transpose(0, 3, 1, 2)
        masks = np.stack([s[1] for s in samples]).transpose(0, 3, 1, 2)
        captions = [shapes.caption(s[2]) for s in samples]
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.ascontiguousarray(masks)), captions


def train_controlnet(
    run: str, s: StageSettings, device="cpu", workers=0, max_seconds=None, log=print, model: str | None = None, **kw
) -> dict:
    """Train (or resume) the ControlNet of the diffusers folder `model` (default: the embedded model) in run/controlnet;
    when finished, export it to run/controlnet/model (config.json + fp16 safetensors)."""
    base = model or DEFAULT_MODEL
    vae = frozen(load_model(os.path.join(base, "vae")), device)
    text = frozen(load_model(os.path.join(base, "text_encoder")), device)
    unet = frozen(load_model(os.path.join(base, "unet")), device)
    caption_ids = CaptionIds(CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")))
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(s.seed)
    controlnet, config = controlnet_from_unet(unet.cpu(), channels=HINT_CHANNELS)
    unet.to(device)
    controlnet = controlnet.to(device).train().requires_grad_(True)
    opt = ck.adamw(ck.param_groups((list(controlnet.parameters()), s.lr)), device)
    ac = alphas_cumprod(SchedulerConfig(**NOISE_SCHEDULE)).to(device)
    folder = os.path.join(run, "controlnet")
    state = ck.read_state(folder)
    data = batches(ControlBatches(s.seed, s.batch, size), state["step"] if state else 0, s.steps, workers)
    cond_dim, x = unet.config.time_cond_proj_dim, s.extra

    def step(i: int) -> dict:
        images, masks, captions = next(data)
        gen = ck.step_generator(s.seed, i, device)
        with torch.no_grad(), ck.autocast(device, s.precision):
            z = vae.encode(to_model_input(images, device)).sample(gen).float() * vae.config.scaling_factor
            context = text(caption_ids(captions).to(device, non_blocking=True)).last_hidden_state
        noise = torch.randn(z.shape, generator=gen, device=z.device)
        t = torch.randint(0, len(ac), (z.shape[0],), generator=gen, device=z.device)
        w_emb = None
        if cond_dim is not None:  # the LCM student's guidance embedding, w as in its distillation
            w = x["w_min"] + (x["w_max"] - x["w_min"]) * torch.rand(z.shape[0], generator=gen, device=z.device)
            w_emb = guidance_scale_embedding(w, cond_dim)
        control = masks.to(device, non_blocking=True).float() / 255.0
        x_t = noised(z, t, noise, ac)
        with ck.autocast(device, s.precision):
            down, mid = controlnet(x_t, t, context, control)
            pred = unet(x_t, t, context, timestep_cond=w_emb, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid)  # fmt: skip
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        return {"loss": loss.detach()}

    settings = {**s.as_dict(), "model": os.path.abspath(base)}
    result = ck.run_loop(folder, settings, {"controlnet": controlnet}, opt, step,
                         save_every=kw.get("save_every", 500), max_seconds=max_seconds, log=log)  # fmt: skip
    if result["done"]:
        save_component(os.path.join(folder, "model"), config, controlnet.state_dict(), torch.float16)
    return result


def generated_mask(image: np.ndarray, labels: shapes.Labels) -> np.ndarray:
    """bool [H, W]: pixels nearer (RGB) to one of the prompt's shape colors than to its background color."""
    pixels = image.astype(np.float32)
    dist = {c: np.linalg.norm(pixels - np.array(shapes.PALETTE[c], np.float32), axis=-1) for c in labels.colors}
    background = np.linalg.norm(pixels - np.array(shapes.PALETTE[labels.background], np.float32), axis=-1)
    return np.min(np.stack(list(dist.values())), axis=0) < background


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def evaluate_controlnet(
    model: str,
    controlnet: str,
    count: int = 500,
    held_out_share: float = 0.2,
    steps: int = 4,
    guidance: float = 8.5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 50,
    seed: int = 0,
    judge_file: str | None = None,
) -> dict:
    """IoU of the generated shapes' mask with the control mask, and judge adherence, on `count` fresh control samples
    (a share with held-out pairs); with and without the ControlNet, same prompts and noise."""
    from diffrt.pipeline import Pipeline
    from diffrt.train import judge as judge_lib

    judge = judge_lib.load_judge(judge_file or judge_lib.JUDGE_FILE, device)
    pipes = {"controlnet": Pipeline.from_pretrained(model, device=device, dtype=dtype, controlnet=controlnet),
             "none": Pipeline.from_pretrained(model, device=device, dtype=dtype)}  # fmt: skip
    size = pipes["none"].spec.default_size
    n_held = round(count * held_out_share)
    held = [n_held > 0 and (i * n_held) // count != ((i + 1) * n_held) // count for i in range(count)]
    samples = [control_sample(EVAL_SEED_START + i, size, "held_out" if h else "train") for i, h in enumerate(held)]
    report = {
        "count": count,
        "held_out": int(sum(held)),
        "steps": steps,
        "guidance": guidance,
        "seed_start": EVAL_SEED_START,
    }
    for name, pipe in pipes.items():
        images = []
        for lo in range(0, count, batch):
            chunk = samples[lo : lo + batch]
            masks = torch.stack([torch.from_numpy(m).permute(2, 0, 1) for _, m, _ in chunk]).float() / 255
            kw = {"control_image": masks} if name == "controlnet" else {}
            captions = [shapes.caption(lab) for _, _, lab in chunk]
            out = pipe(captions, steps=steps, guidance_scale=guidance, seed=seed + lo, output_type="np", **kw)
            images.append((out * 255).round().astype(np.uint8))
        images = np.concatenate(images)
        ious = [
            iou(generated_mask(img, lab), m[..., 0] > 127) for img, (_, m, lab) in zip(images, samples, strict=True)
        ]
        judged = judge_lib.adherence(judge, images, [lab for _, _, lab in samples])
        matches = np.array(judged["matches"])
        report[name] = {
            "iou_mean": float(np.mean(ious)),
            "iou_median": float(np.median(ious)),
            "iou_at_least_0.8": float(np.mean(np.array(ious) >= 0.8)),
            "adherence": judged["all"],
            "adherence_held_out": float(matches[np.array(held)].mean()) if any(held) else None,
            "per_head": judged["per_head"],
        }
        if name == "controlnet":
            report["grid"] = _grid(samples[:8], images[:8])
    return report


def _grid(samples, images: np.ndarray) -> Image.Image:
    """Rows: the dataset image, its control mask, the generated image."""
    size = images.shape[1]
    canvas = Image.new("RGB", (size * len(images), size * 3))
    for i, ((image, mask, _), generated) in enumerate(zip(samples, images, strict=True)):
        for row, tile in enumerate((image, mask, generated)):
            canvas.paste(Image.fromarray(tile), (i * size, row * size))
    return canvas
