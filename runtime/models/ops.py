"""Which kernels a model's GroupNorm(+SiLU) and attention call: an `Ops` record held by each module that uses one.

Kernel selection is per model instance (`set_ops(model, TRITON_OPS)`), never process state, so two models in one
process (two pipelines, two threads) can run different kernels. Every module starts on `TORCH_OPS`, the reference.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Ops:
    """The implementations one model calls; each takes and returns tensors in the layers' own layout."""

    name: str
    group_norm: Callable[..., torch.Tensor]  # (x [N, C, *], num_groups, weight, bias, eps, silu) -> like x
    attention: Callable[..., torch.Tensor]  # (q [B, H, Sq, D], k, v [B, H, Sk, D], any strides) -> [B, H, Sq, D]


def group_norm_torch(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool
) -> torch.Tensor:
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


# The Triton kernels take CUDA tensors (fp16/bf16 for attention; fp32/fp16/bf16 for GroupNorm); anything else (CPU
# tensors, fp32 attention, the VAE's single 512-wide head) runs torch's implementation, so choosing these ops never
# changes which inputs work. Under TRITON_INTERPRET=1 the kernels run on CPU tensors through Triton's interpreter
# (how CI tests them).
_KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on") else "cuda"
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # the attention kernel's limit


def group_norm_triton(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool
) -> torch.Tensor:
    if x.device.type != _KERNEL_DEVICE:
        return group_norm_torch(x, num_groups, weight, bias, eps, silu)
    from diffrt.kernels.group_norm import group_norm as kernel  # imported on first use: Triton loads lazily

    return kernel(x, num_groups, weight, bias, eps, silu=silu)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not (q.device.type == _KERNEL_DEVICE and q.dtype in _ATTENTION_DTYPES and q.shape[-1] <= _MAX_HEAD_DIM):
        return attention_torch(q, k, v)
    from diffrt.kernels.attention import attention as kernel

    # The kernel reads [B, S, H, D]; these are views of the same memory, so no copy is made either way.
    return kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


TORCH_OPS = Ops("torch", group_norm_torch, attention_torch)
TRITON_OPS = Ops("triton", group_norm_triton, attention_triton)


def set_ops(model: nn.Module, ops: Ops) -> nn.Module:
    """Route every GroupNorm and attention inside `model` (this instance only) through `ops`; returns `model`."""
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), Ops):
            module.ops = ops
    return model


def ops_of(model: nn.Module) -> set[str]:
    """The names of the ops a model's modules use (one name once `set_ops` has run)."""
    return {m.ops.name for m in model.modules() if isinstance(getattr(m, "ops", None), Ops)}
