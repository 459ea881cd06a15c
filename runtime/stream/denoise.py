"""The stream's denoising: each in-flight frame at its own step, in one UNet batch (stream batch) or one step after
another (per frame), under one of StreamDiffusion's guidance modes. Device work only, no host sync: it runs inside a
CUDA graph replay.

Every frame's numbers depend on its own latents, residual noise and the fixed per-step noise alone (the UNet treats
each batch entry separately), so the stream batch is a scheduling change: the picture of frame k is the same either
way (tests/test_stream.py).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from diffrt.roles import Conditioning, Denoiser
from diffrt.stream.coefficients import StepCoefficients


@dataclass
class GuidanceInputs:
    """Static buffers the guidance reads: [1, 77, C] embeddings (a prompt change copies into them), LCM's guidance
    embedding [1, D] or None, and 0-d scale and delta."""

    embeds: Tensor
    uncond_embeds: Tensor | None  # the negative prompt's, for "initialize" and "full"
    timestep_cond: Tensor | None
    scale: Tensor
    delta: Tensor


class StreamDenoiser:
    """Model output -> LCM consistency step for a batch of slots (slot j holds `frames` consecutive frames at step j,
    one batch entry each, slot after slot)."""

    def __init__(self, denoiser: Denoiser, mode: str, inputs: GuidanceInputs, clip: float | None,
                 frames: int = 1) -> None:  # fmt: skip
        self.denoiser, self.mode, self.inputs, self.clip, self.frames = denoiser, mode, inputs, clip, frames
        self.residual = mode in ("self", "initialize")

    def _cond(self, embeds: list[tuple[Tensor, int]]) -> Conditioning:
        """Conditioning for a batch made of (embeddings [1, 77, C], count) runs, as expanded views (no copy)."""
        parts = [e.expand(count, -1, -1) for e, count in embeds]
        total = sum(count for _, count in embeds)
        cond = self.inputs.timestep_cond
        return Conditioning(embeds=torch.cat(parts) if len(parts) > 1 else parts[0],
                            timestep_cond=None if cond is None else cond.expand(total, -1))  # fmt: skip

    def guided(self, x: Tensor, k: StepCoefficients, stock: Tensor | None, first: bool) -> tuple[Tensor, Tensor | None]:
        """(guided model output, residual noise) for batch entries x [m] at steps k (one entry each). first: slot 0
        holds frames at their first step ("initialize" evaluates their unconditional output once there and makes it
        their residual noise)."""
        m, t, g, f = x.shape[0], k.timestep, self.inputs.scale, self.frames
        cond, uncond = self.inputs.embeds, self.inputs.uncond_embeds
        if self.mode == "full":  # classifier-free guidance, unconditional half first as the pipeline batches it
            out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), self._cond([(uncond, m), (cond, m)]))
            u, c = out.chunk(2)
            return u + g * (c - u), stock
        if self.mode == "initialize" and first:
            out = self.denoiser(torch.cat([x[:f], x]), torch.cat([t[:f], t]), self._cond([(uncond, f), (cond, m)]))
            stock, c = torch.cat([out[:f], stock[f:]]), out[f:]
        else:
            c = self.denoiser(x, t, self._cond([(cond, m)]))
        if not self.residual:
            return c, stock
        u = stock * self.inputs.delta  # residual CFG: the virtual residual noise stands in for the unconditional output
        return u + g * (c - u), stock

    def consistency(self, x: Tensor, out: Tensor, k: StepCoefficients) -> Tensor:
        """LCM's denoised estimate c_out * x0 + c_skip * x (the arithmetic of X0Predictor then sample_lcm)."""
        x0 = x * k.x0_from_x + out.to(x.dtype) * k.x0_from_out
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0 * k.c_out + x * k.c_skip

    def next_residual(self, guided: Tensor, stock: Tensor, k: StepCoefficients, noise_next: Tensor) -> Tensor:
        """The virtual residual noise at the next step, as StreamDiffusion 0.1.1's unet_step updates its stock noise:
        the next step's fixed noise plus the scaled consistency step of (noise level x residual noise)."""
        delta_x = (stock * k.noise) * k.x0_from_x + guided.to(stock.dtype) * k.x0_from_out
        delta_x = delta_x * k.c_out + (stock * k.noise) * k.c_skip
        return noise_next + delta_x * k.next_signal / k.next_noise

    def batched(self, x_new: Tensor, stock_new: Tensor, state: Tensor, stock: Tensor | None, noise: Tensor,
                k: StepCoefficients) -> Tensor:  # fmt: skip
        """One stream-batch step: the newest frames [F] at step 0 beside the in-flight ones (`state` [(n-1) F], their
        residual noise `stock`); writes the advanced state back in place and returns the finished frames' denoised
        latents [F]. k and noise hold one entry per step (slot)."""
        n, f = k.timestep.shape[0], self.frames
        rows = k.repeated(f)
        x = torch.cat([x_new, state]) if n > 1 else x_new
        s = (torch.cat([stock_new, stock]) if n > 1 else stock_new) if self.residual else None
        guided, s = self.guided(x, rows, s, first=True)
        denoised = self.consistency(x, guided, rows)
        if n > 1:
            head, noise_next = rows[: (n - 1) * f], noise[1:].repeat_interleave(f, 0)
            state.copy_(denoised[:-f] * head.next_signal + noise_next * head.next_noise)
            if self.residual:
                stock.copy_(self.next_residual(guided[:-f], s[:-f], head, noise_next))
        return denoised[-f:].to(x_new.dtype)

    def per_frame(self, x: Tensor, stock: Tensor, noise: Tensor, k: StepCoefficients) -> Tensor:
        """Every step of one group of frames x [F] in turn (stream batch off): the same numbers as their slots in
        `batched`. k and noise hold one entry per step, shared by the group."""
        n = k.timestep.shape[0]
        s = stock if self.residual else None
        for j in range(n):
            kj = k[j : j + 1].repeated(self.frames)
            guided, s = self.guided(x, kj, s, first=j == 0)
            denoised = self.consistency(x, guided, kj)
            if j + 1 < n:
                x = (denoised * kj.next_signal + noise[j + 1 : j + 2] * kj.next_noise).to(x.dtype)
                if self.residual:
                    s = self.next_residual(guided, s, kj, noise[j + 1 : j + 2]).to(x.dtype)
        return denoised.to(x.dtype)
