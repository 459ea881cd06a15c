"""Backends: how a pipeline's components run. "torch": eager on torch's ops, the reference; "triton": eager on
diffrt's fused kernels; "cuda-graph": whole generations replayed from CUDA graphs, the default on a GPU. A backend is
an object its pipeline owns, never process state, so two pipelines with different backends live in one process (and
in two threads) and each gives its own images.

A backend makes the pipeline's roles (diffrt.roles) from its components and runs a generation plan (diffrt.plan):

    roles(components, dtype) -> Roles          once, when the pipeline is built
    run(plan, roles, callback) -> (images, latents)   per call; images [B, 3, H, W] in [0, 1]
"""

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the protocol's types only: importing the backends' names stays cheap (the CLI lists them)
    import torch
    from torch import Tensor

    from diffrt.components import Components
    from diffrt.plan import GenerationPlan
    from diffrt.roles import Roles
    from diffrt.samplers import Callback


class Backend(Protocol):
    name: str

    def roles(self, components: "Components", dtype: "torch.dtype") -> "Roles": ...

    def run(
        self, plan: "GenerationPlan", roles: "Roles", callback: "Callback | None" = None
    ) -> "tuple[Tensor, Tensor]": ...


BACKENDS = ("torch", "triton", "cuda-graph", "onnxruntime", "tensorrt")


def default_backend(device: "str | torch.device") -> str:
    """The backend a pipeline on `device` gets when none is named: the fastest one that runs there (whole
    generations replayed from CUDA graphs on a GPU; torch eager elsewhere)."""
    import importlib.util

    import torch

    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return "cuda-graph" if cuda and importlib.util.find_spec("triton") is not None else "torch"


def make_backend(backend: "str | Backend") -> "Backend":
    """A backend by name (BACKENDS), or the given backend object itself. By name, "onnxruntime" and "tensorrt" export
    the pipeline's modules on first use into a cache folder; construct OnnxRuntimeBackend(DIR) or
    TensorRTBackend(DIR, ...) to run a `diffrt export` folder or choose providers, profiles and caches."""
    if not isinstance(backend, str):
        return backend
    from diffrt.backends.eager import EagerBackend
    from diffrt.models.ops import TORCH_OPS, TRITON_OPS

    if backend == "torch":
        return EagerBackend("torch", TORCH_OPS)
    if backend == "triton":
        return EagerBackend("triton", TRITON_OPS)
    if backend == "cuda-graph":
        from diffrt.backends.cuda_graph import CudaGraphBackend

        return CudaGraphBackend()
    if backend == "onnxruntime":
        from diffrt.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend()
    if backend == "tensorrt":
        from diffrt.backends.tensorrt import TensorRTBackend

        return TensorRTBackend()
    raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
