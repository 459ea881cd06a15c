"""Checks shared by the Triton kernel tests (tests/test_group_norm.py, tests/test_attention.py)."""

import pytest
import torch

# (dtype, atol, rtol) against an fp32 reference; the floor is the absolute slack added to "2x torch's error".
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


# (dtype, atol, rtol) as pytest parameters, labelled by dtype: the kernel tests' dtype axis.
DTYPES = [pytest.param(dt, *tol, id=str(dt).removeprefix("torch.")) for dt, tol in TOLERANCES.items()]


def device() -> str:
    """Kernels run on CUDA where there is one, else through Triton's interpreter on the CPU (tests/conftest.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN (same strides as t), so any element the kernel fails to write fails the check."""
    return torch.full_like(t, float("nan"))


def check_output(
    out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, atol: float, rtol: float, what: str
) -> tuple[float, float]:
    """out and torch_out (torch's own op in the same dtype) against the fp32 reference ref.

    Fails on any non-finite element, on |out - ref| > atol + rtol * |ref|, and when out's max error exceeds twice
    torch's plus atol / 4 (the slack matters only where torch's own error is near zero, e.g. fp32).
    """
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"{what}: {bad} of {out.numel()} outputs are NaN/Inf (unwritten elements keep their NaN poison)"
    outf, ref = out.float(), ref.float()
    torch.testing.assert_close(outf, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    err = (outf - ref).abs().max().item()
    torch_err = (torch_out.float() - ref).abs().max().item()
    assert err <= 2 * torch_err + atol / 4, f"{what}: max error {err:.3g} > 2 x torch's {torch_err:.3g} + {atol / 4:g}"
    return err, torch_err
