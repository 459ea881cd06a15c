"""Error measures shared by the benchmarks (each row's error against the reference) and the tests."""

import torch


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the issue's "max relative error", stable near zero elements."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "output has NaN/Inf"
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()
