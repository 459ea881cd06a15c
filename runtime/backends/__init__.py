"""Backends: how the pipeline's components run. `torch` (eager, the reference) is the default; `triton` routes every
GroupNorm(+SiLU) and attention through diffrt's fused kernels (diffrt.backends.triton)."""

BACKENDS = ("torch", "triton")


def use_backend(name: str) -> None:
    """Switch every model's GroupNorm/attention to `name`'s implementation (process-wide)."""
    from diffrt.models.layers import use_ops

    if name == "torch":
        use_ops()
    elif name == "triton":
        from diffrt.backends.triton import attention, group_norm

        use_ops(group_norm=group_norm, attention=attention)
    else:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
