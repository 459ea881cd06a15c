"""Shared comparison helpers for parity tests against diffusers/transformers."""

import torch

from benchmarks.accuracy import max_rel_error

__all__ = ["assert_parity", "max_rel_error"]


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4, what: str = "output") -> None:
    err = max_rel_error(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.0e}"
