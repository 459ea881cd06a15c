"""Training batches from the procedural dataset: batch k of a run is the samples of seeds base + k*B .. + B-1.

A batch depends only on (seed, step), so a resumed run sees exactly the batches an uninterrupted one would; a
DataLoader with worker processes draws them in parallel (each worker renders whole batches) without changing them.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffrt.train import shapes

SEED_STRIDE = 10**8  # run seed s draws dataset seeds from s * SEED_STRIDE: runs with other seeds see other images


class StepBatches(Dataset):
    """Map-style dataset whose item `step` is that step's batch: (images uint8 [B, 3, S, S] or None, captions,
    labels [B, len(HEADS)])."""

    def __init__(self, seed: int, batch: int, size: int, split: str = "train", images: bool = True):
        if split not in shapes.SPLITS:
            raise ValueError(f"split {split!r} is not one of {shapes.SPLITS}")
        self.base, self.batch, self.size, self.split, self.images = seed * SEED_STRIDE, batch, size, split, images

    def __len__(self) -> int:
        return SEED_STRIDE // self.batch

    def __getitem__(self, step: int):
        first = self.base + step * self.batch
        images, captions, labels = shapes.batch(range(first, first + self.batch), self.size, self.split, self.images)
        if images is not None:
            images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return images, captions, torch.from_numpy(labels)


def batches(dataset: StepBatches, start: int, stop: int, workers: int = 0):
    """Iterate the batches of steps start..stop-1, in order, rendered by `workers` processes (0: in this one)."""
    if workers == 0:
        return (dataset[i] for i in range(start, stop))
    return iter(
        DataLoader(
            dataset,
            batch_size=None,
            sampler=range(start, stop),
            num_workers=workers,
            prefetch_factor=4,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),  # so the copy to the GPU is asynchronous
        )
    )


def to_model_input(images: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> [-1, 1], the VAE's input range."""
    return images.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0


class CaptionIds:
    """A tokenizer's ids for captions, each distinct caption tokenized once: the grammar repeats captions, and
    tokenizing a 256-caption batch costs ~9 ms of the host's time every step, time the GPU would wait for."""

    def __init__(self, tokenizer):
        self.tokenizer, self.rows = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if new:
            self.rows.update(zip(new, self.tokenizer(new).tolist(), strict=True))
        return torch.tensor([self.rows[c] for c in captions], dtype=torch.long)
