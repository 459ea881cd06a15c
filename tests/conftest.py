"""Test-session setup shared by all test files.

Triton decides when a kernel is defined (at import of its module) whether to compile it or run it in its CPU
interpreter, so TRITON_INTERPRET must be set before any test module imports diffrt.kernels: here, without a CUDA
GPU. On the GPU it stays unset (an explicit TRITON_INTERPRET in the environment is respected either way).
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_installed_kernels_package() -> None:
    """transformers (5.25 and later) depends on Hugging Face's `kernels` package and imports it with transformers'
    models. pytest puts this repository's root first on sys.path (tests/ is a package), and there our top-level
    `kernels/` folder (installed as diffrt.kernels) would be found under that name instead: transformers then fails
    to import ("cannot import name 'CUDAProperties' from 'kernels'"). Import the installed package first, with the
    root off the path, so that `kernels` means it from then on; diffrt only ever imports `diffrt.kernels`."""
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    try:
        if importlib.util.find_spec("kernels") is not None:
            import kernels  # noqa: F401
    finally:
        sys.path[:] = saved


_import_installed_kernels_package()
