"""Checks of a generation request made before any work, with errors a user can act on."""

import math

from diffrt.schedules import SAMPLER_NAMES

OUTPUT_TYPES = ("pil", "np", "pt")


def nearest_multiples(value: int, multiple: int) -> str:
    below = max(multiple, value // multiple * multiple)
    above = below + multiple if below < value else below
    return f"{below}" if below == above else f"{below} or {above}"


ETA_SAMPLERS = ("ddim", "tcd")  # the samplers whose fresh noise per step is scaled by eta (TCD: its gamma)


def check_generation_args(
    *,
    height: int,
    width: int,
    steps: int,
    sampler: str,
    strength: float | None,
    batch: int,
    prompts: list[str],
    multiple: int = 8,
    output_type: str = "pil",
    eta: float | None = None,
) -> None:
    """Raise ValueError naming the bad value and what is allowed. strength is None for txt2img; eta None: the
    sampler's own."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < multiple:
            raise ValueError(f"{name} {value!r} must be a positive integer multiple of {multiple}")
        if value % multiple:
            raise ValueError(
                f"{name} {value} is not a multiple of {multiple}; try {nearest_multiples(value, multiple)}"
            )
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps {steps!r} must be an integer >= 1")
    if strength is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength {strength} must be in (0, 1] (1 replaces the image entirely)")
        if int(steps * strength) < 1:  # img2img runs the last int(steps * strength) steps, as diffusers
            raise ValueError(
                f"strength {strength} with {steps} steps runs int({steps} * {strength}) = 0 steps; "
                f"raise strength to >= {1 / steps:g} or steps to >= {math.ceil(1 / strength)}"
            )
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch {batch!r} must be an integer >= 1")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}")
    if eta is not None:
        if sampler not in ETA_SAMPLERS:
            raise ValueError(f"eta applies to the {' and '.join(ETA_SAMPLERS)} samplers only, not {sampler!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta {eta} must be in [0, 1] (0: deterministic)")
