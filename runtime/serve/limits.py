"""What one request may ask of this server: size, steps and image count, from the model and the device's memory.

The memory part is diffrt.memory's estimate (the one `diffrt generate` refuses an oversized request with; the least
a generation can run in, its decode in the smallest tiles, diffrt.tiled_decode), checked against a budget measured
once when the server starts, idle, with the model loaded: while a generation runs, the device's free memory says
nothing about whether the next one fits. A request over a limit is refused with 400 and the limit before it is
queued.
"""

from dataclasses import asdict, dataclass

import torch

from diffrt.memory import available_bytes
from diffrt.model_spec import ModelSpec

HEADROOM = 0.85  # the share of the measured free memory a generation may plan to use (allocator slack, graphs)
SIDE_FACTOR = 4  # without a --max-size, sides up to this many times the model's default size (CPU time bounds it)


@dataclass(frozen=True)
class ServeLimits:
    max_side: int  # pixels, for width and height each
    max_n: int  # images per request
    max_steps: int
    memory_budget: int | None  # bytes a generation's activations may take; None: unknown (nothing refused for it)
    max_prompt_chars: int = 4000  # CLIP reads 77 tokens; longer text is only parsing work

    def problems(self, *, n: int, width: int | None, height: int | None, steps: int | None, prompt: str) -> list[str]:
        """Each limit the request is over, naming its field and the limit."""
        out = []
        if not 1 <= n <= self.max_n:
            out.append(f"n {n} is outside this server's range 1..{self.max_n}")
        for name, value in (("width", width), ("height", height)):
            if value is not None and value > self.max_side:
                out.append(f"size: {name} {value} is over this server's limit of {self.max_side} pixels")
        if steps is not None and steps > self.max_steps:
            out.append(f"steps {steps} is over this server's limit of {self.max_steps}")
        if len(prompt) > self.max_prompt_chars:
            out.append(f"prompt is {len(prompt)} characters; this server takes at most {self.max_prompt_chars}")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def derive_limits(
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    *,
    max_side: int | None = None,
    max_n: int = 10,
    max_steps: int = 100,
    memory_budget: int | None = None,
) -> ServeLimits:
    """Limits for `spec` on `device`: the caps asked for, lowered to what the memory budget (default: HEADROOM of
    what the device has free now, the model loaded) fits with guidance on where the model may run it."""
    if memory_budget is None:
        free = available_bytes(torch.device(device))
        memory_budget = None if free is None else int(free * HEADROOM)
    scale = spec.vae_scale
    side = max_side or SIDE_FACTOR * spec.default_size
    side -= side % scale
    cfg = spec.guidance_embedding_dim is None  # an LCM UNet embeds guidance: never a second batch

    def fits(n: int, px: int) -> bool:
        return memory_budget is None or spec.memory.least_bytes(n, px, px, scale, dtype, cfg) <= memory_budget

    while side > scale and not fits(1, side):
        side -= scale
    n = max_n
    while n > 1 and not fits(n, min(side, spec.default_size)):
        n -= 1
    return ServeLimits(max_side=side, max_n=n, max_steps=max_steps, memory_budget=memory_budget)
