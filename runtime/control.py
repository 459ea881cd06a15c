"""ControlNet guidance as the plan runs it: the host decides per step which ControlNets run and at what scale; each
step's denoiser runs those on the step's input and hands their summed residuals to the UNet's denoiser through the
conditioning record.

As diffusers' StableDiffusion(XL)ControlNet(Img2Img)Pipeline: the control image is resized to the output (Lanczos)
and kept in [0, 1], repeated per image and doubled under classifier-free guidance (the ControlNet sees the same
batch as the UNet); ControlNet k is kept at step i of n unless i / n < start_k or (i + 1) / n > end_k; several
ControlNets add their residuals. A step where a ControlNet is not kept (or its scale is 0) does not run it at all
(diffusers runs it and multiplies by 0: the same numbers, more work).
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffrt.images import image_to_tensor
from diffrt.roles import Conditioning, ControlNet, Denoiser


@dataclass(frozen=True)
class ControlPlan:
    images: tuple[Tensor, ...]  # one per ControlNet: [B, C, H, W] in [0, 1] on the device (B = the denoiser's batch)
    scales: Tensor  # [steps, ControlNets] float32 on the device: conditioning scale where kept, else 0
    active: tuple[tuple[bool, ...], ...]  # host: per step, which ControlNets run (kept, with a nonzero scale)

    @property
    def bucket(self) -> tuple:
        """What a captured graph of this plan fixes: which ControlNets run at which step, and the images' shapes.
        The scales are read from `scales` on the device, so another scale needs no new graph."""
        return self.active, tuple(tuple(image.shape) for image in self.images)


def keep(steps: int, start: float, end: float) -> list[bool]:
    """Whether a ControlNet guides each step: diffusers' controlnet_keep."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def make_control_plan(
    images: Sequence,
    scales: Sequence[float],
    starts: Sequence[float],
    ends: Sequence[float],
    *,
    steps: int,
    per_prompt: int,
    total: int,
    cfg: bool,
    height: int,
    width: int,
    device: torch.device,
    dtype: torch.dtype,
) -> ControlPlan:
    """The host's part: control images (PIL or [B, C, H, W] tensors) prepared as diffusers' prepare_image does, and
    the per-step schedule of each ControlNet. `total` images are made, `per_prompt` of each prompt."""
    prepared = []
    for image in images:
        x = image_to_tensor(image, height, width)
        x = x.repeat_interleave(total if x.shape[0] == 1 else per_prompt, dim=0)
        x = x.to(device=device, dtype=dtype)
        prepared.append(torch.cat([x, x]) if cfg else x)
    kept = [keep(steps, s, e) for s, e in zip(starts, ends, strict=True)]
    table = [[scale if k[i] else 0.0 for scale, k in zip(scales, kept, strict=True)] for i in range(steps)]
    active = tuple(tuple(v != 0.0 for v in row) for row in table)
    scale_tensor = torch.tensor(table, dtype=torch.float32).to(device)
    return ControlPlan(tuple(prepared), scale_tensor, active)


class ControlledDenoiser:
    """Step `step`'s denoiser: the UNet's, given the residuals of the ControlNets that run at this step."""

    def __init__(self, denoiser: Denoiser, controlnets: Sequence[ControlNet], plan: ControlPlan, step: int) -> None:
        self.denoiser, self.controlnets, self.plan, self.step = denoiser, controlnets, plan, step

    def __call__(self, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        down, mid = None, None
        for k, controlnet in enumerate(self.controlnets):
            if not self.plan.active[self.step][k]:
                continue
            d, m = controlnet(latents, timestep, cond, self.plan.images[k], self.plan.scales[self.step, k])
            down = d if down is None else tuple(a + b for a, b in zip(down, d, strict=True))
            mid = m if mid is None else mid + m
        if down is None:
            return self.denoiser(latents, timestep, cond)
        return self.denoiser(latents, timestep, replace(cond, down_residuals=down, mid_residual=mid))


def step_denoisers(denoiser: Denoiser, controlnets: Sequence[ControlNet], plan: ControlPlan) -> list[Denoiser]:
    """One denoiser per step of the plan (steps without any ControlNet get the UNet's own)."""
    return [
        ControlledDenoiser(denoiser, controlnets, plan, i) if any(row) else denoiser
        for i, row in enumerate(plan.active)
    ]
