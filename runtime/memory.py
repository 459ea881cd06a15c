"""How much memory a generation needs, estimated before any work, against what the device has free.

The estimate is the weights plus the larger of the two peaks a generation goes through: the UNet step (every skip
held for the up path, plus the working set of its widest level) and the VAE decode (a few full tensors at the
largest channels-times-pixels resolution). Activations grow with the pixel count, so this is what refuses a
16384x16384 request up front instead of letting it run out of memory (or swap for hours) half way through.
The constants below are deliberately on the generous side of what was seen; `check_memory=False` (CLI:
`--no-memory-check`) skips the check for users who know better.
"""

import math
import os
from dataclasses import dataclass

import torch

from diffrt.tiled_decode import MIN_TILE

UNET_WORKING_SET = 16  # tensors of the widest level's size alive at once (q, k, v, GEGLU's 8x-wide projection, ...)
DECODER_WORKING_SET = 6  # tensors of the decoder's largest resolution alive at once (input, norm, conv, upsample)


@dataclass(frozen=True)
class MemoryModel:
    """The architecture numbers the estimate needs, read from the component configs."""

    parameters: int  # all components
    unet_levels: tuple[tuple[int, int, bool], ...]  # per level: (channels, skips it keeps, has attention)
    decoder_levels: tuple[int, ...]  # channels at each decoder resolution, from the latents' (x1) upward (x2 each)
    vae_upcast: bool = False  # the VAE runs in fp32 whatever the pipeline's dtype

    def activation_bytes(self, batch: int, height: int, width: int, scale: int, dtype: torch.dtype, cfg: bool) -> int:
        """Peak activation bytes of one generation of `batch` images at height x width pixels, decoded whole."""
        return max(self.unet_bytes(batch, height, width, scale, dtype, cfg),
                   self.decoder_bytes(batch, height, width, scale, dtype))  # fmt: skip

    def least_bytes(self, batch: int, height: int, width: int, scale: int, dtype: torch.dtype, cfg: bool) -> int:
        """The least peak activation bytes such a generation can run in: its decode in the smallest tiles."""
        tile_h, tile_w = min(height, MIN_TILE), min(width, MIN_TILE)
        return max(self.unet_bytes(batch, height, width, scale, dtype, cfg),
                   self.decoder_bytes(1, tile_h, tile_w, scale, dtype))  # fmt: skip

    def unet_bytes(self, batch: int, height: int, width: int, scale: int, dtype: torch.dtype, cfg: bool) -> int:
        """Peak activation bytes of one UNet step: every skip held for the up path, the widest level's working set."""
        item = dtype.itemsize
        latent_pixels = (height // scale) * (width // scale)
        unet_batch = batch * (2 if cfg else 1)
        skips = widest = 0
        for level, (channels, kept, _) in enumerate(self.unet_levels):
            size = channels * math.ceil(latent_pixels / 4**level)
            skips += kept * size
            widest = max(widest, size)
        return unet_batch * item * (skips + UNET_WORKING_SET * widest)

    def decoder_bytes(self, batch: int, height: int, width: int, scale: int, dtype: torch.dtype) -> int:
        """Peak activation bytes of decoding `batch` images of height x width pixels at once."""
        latent_pixels = (height // scale) * (width // scale)
        vae_item = 4 if self.vae_upcast else dtype.itemsize
        largest = max(c * latent_pixels * 4**i for i, c in enumerate(self.decoder_levels))
        return batch * vae_item * DECODER_WORKING_SET * largest

    def weight_bytes(self, dtype: torch.dtype) -> int:
        return self.parameters * dtype.itemsize


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take on `device`: free device memory plus what torch's caching allocator holds
    unused; on a CPU the kernel's MemAvailable. None where it cannot be told (then nothing is refused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def gib(n: int) -> str:
    """A byte count for messages: MiB below 1 GiB (so that small budgets do not read "0.0 GiB")."""
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"
