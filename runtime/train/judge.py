"""The prompt-adherence judge: a small CNN that reads the attributes (HEADS of diffrt.train.shapes) off an image.

It is trained on procedural images with their exact labels (all splits: the judge must know the held-out pairs too),
with mild noise, blur and brightness jitter so that it also reads the less crisp images a diffusion model makes.
Adherence of a set of generated images = the share whose judged attributes ALL equal the prompt's.
The shipped weights are `judge.safetensors` beside this file; runtime/train/README.md records how they were made.
"""

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from diffrt.train import shapes
from diffrt.train.checkpoint import atomic_save_file

JUDGE_FILE = os.path.join(os.path.dirname(__file__), "judge.safetensors")
EVAL_SEED_START = 10**9  # evaluation seeds; training draws seeds from 0 upwards and never gets near


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int = 64
    # A 4x4 stride-4 "patchify" stem, then 3x3 convs with strides 1, 2, 1, 2: 64 px -> 4x4 features. Cheap enough to
    # train on two CPU cores, fine enough to tell a 13-pixel star from a triangle.
    widths: tuple[int, ...] = (32, 32, 64, 64, 96)
    hidden: int = 128

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))


_KERNELS = (4, 3, 3, 3, 3)
_STRIDES = (4, 1, 2, 1, 2)


class Judge(nn.Module):
    """Image [B, 3, S, S] in [0, 1] -> one logit vector per head (dict in HEADS order)."""

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for width, k, stride in zip(config.widths, _KERNELS, _STRIDES, strict=True):
            conv = nn.Conv2d(c_in, width, k, stride, (k - 1) // 2 if k == 3 else 0, bias=False)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c_in = width
        self.features = nn.Sequential(*layers)
        side = config.image_size // math.prod(_STRIDES)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, config.hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.hidden, len(classes)) for name, classes in shapes.HEADS.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(self.features(x - 0.5))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images) -> np.ndarray:
        """Label indices [N, len(HEADS)] for images: uint8 [N, H, W, 3] (numpy) or float [N, 3, H, W] in [0, 1]."""
        x = to_input(images, self.config.image_size, next(self.parameters()).device)
        was = self.training
        self.eval()
        out = self(x)
        self.train(was)
        return torch.stack([out[h].argmax(-1) for h in shapes.HEADS], dim=1).cpu().numpy()


def to_input(images, size: int, device="cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] / float [N, 3, H, W] in [0, 1] -> float [N, 3, size, size] (area-resized if needed)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 [N, H, W, 3]; got {images.dtype} {images.shape}")
        images = images if images.flags.writeable else images.copy()  # torch warns on read-only arrays
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    else:
        x = images.float()
    x = x.to(device)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def load_judge(path: str = JUDGE_FILE, device="cpu") -> Judge:
    if not os.path.isfile(path):
        raise ValueError(f"judge weights {path} do not exist; train them with `diffrt train judge --out {path}`")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "judge_config" not in meta:
        raise ValueError(f"{path} has no judge_config metadata; it was not written by diffrt train judge")
    judge = Judge(JudgeConfig(**json.loads(meta["judge_config"])))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    judge.load_state_dict(state)
    return judge.to(device).eval()


def save_judge(judge: Judge, path: str, extra: dict | None = None) -> None:
    """fp16 weights (the file stays under 1 MB); BatchNorm's counters stay int64."""
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in judge.state_dict().items()}
    meta = {"judge_config": json.dumps(asdict(judge.config)), **{k: str(v) for k, v in (extra or {}).items()}}
    atomic_save_file(state, path, metadata=meta)


def adherence(judge: Judge, images, prompts: Sequence[shapes.Labels]) -> dict:
    """{"all": share of images whose judged attributes all match, "per_head": {head: share}, "matches": [bool]}."""
    predicted = judge.predict(images)
    expected = np.array([shapes.label_indices(p) for p in prompts])
    hits = predicted == expected
    matches = hits.all(axis=1)
    per_head = {h: float(hits[:, i].mean()) for i, h in enumerate(shapes.HEADS)}
    return {"all": float(matches.mean()), "per_head": per_head, "matches": matches.tolist()}


def evaluate(judge: Judge, count: int, split: str = "all", start: int = EVAL_SEED_START, batch: int = 250) -> dict:
    """Per-image all-attributes accuracy (and per head) on `count` fresh procedural images of a split."""
    images, labels = [], []
    for lo in range(start, start + count, batch):
        seeds = range(lo, min(lo + batch, start + count))
        samples = [shapes.sample(s, judge.config.image_size, split) for s in seeds]
        images.append(np.stack([s.image for s in samples]))
        labels += [s.labels for s in samples]
    result = adherence(judge, np.concatenate(images), labels)
    return {"count": count, "split": split, "accuracy": result["all"], "per_head": result["per_head"]}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise, blur and brightness jitter of the kind a decoder leaves, never enough to change a color's name."""
    n = x.shape[0]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    blur = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (blur[:, None] * blur[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mix = (rand(n, 1, 1, 1) < 0.5) * rand(n, 1, 1, 1)
    x = x + mix * (blurred - x)
    x = x * (1 + 0.1 * (rand(n, 1, 1, 1) - 0.5)) + 0.06 * (rand(n, 1, 1, 1) - 0.5)
    x = x + torch.randn(x.shape, generator=generator) * 0.04 * rand(n, 1, 1, 1)
    return x.clamp(0, 1)


def train_judge(
    out: str, steps: int = 8000, batch: int = 64, lr: float = 2e-3, seed: int = 0, log_every: int = 200, log=print
) -> Judge:
    """Train from scratch on procedural images (seeds seed*10**8 + step*batch + i, split "all") and save to `out`."""
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    start, t0 = seed * 10**8, time.time()
    for step in range(steps):
        first = start + step * batch
        images, _, labels = shapes.batch(range(first, first + batch), judge.config.image_size, "all")
        x = augment(to_input(images, judge.config.image_size), gen)
        y = torch.from_numpy(labels)
        out_logits = judge(x)
        loss = sum(F.cross_entropy(out_logits[h], y[:, i]) for i, h in enumerate(shapes.HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    judge.eval()
    save_judge(judge, out, {"steps": steps, "batch": batch, "lr": lr, "seed": seed})
    return judge
