"""Test-session setup shared by all test files.

Triton decides when a kernel is defined (at import of its module) whether to compile it or run it in its CPU
interpreter, so TRITON_INTERPRET must be set before any test module imports diffrt.kernels: here, without a CUDA
GPU. On the GPU it stays unset (an explicit TRITON_INTERPRET in the environment is respected either way).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
