"""The models' GroupNorm and attention on diffrt's Triton kernels, where the kernels apply.

The kernels take CUDA tensors (fp16/bf16 for attention; fp32/fp16/bf16 for GroupNorm); anything else (CPU tensors,
fp32 attention) runs torch's implementation, so switching this backend on never changes which inputs work.
"""

import os

import torch

from diffrt.models.layers import _attention_torch, _group_norm_torch

_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # the kernel's limit: the VAE's single 512-wide head runs on torch
# Under TRITON_INTERPRET=1 the kernels run on CPU tensors through Triton's interpreter (how CI tests them).
_KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on") else "cuda"


def group_norm(x, num_groups, weight, bias, eps, silu=False):
    if x.device.type != _KERNEL_DEVICE:
        return _group_norm_torch(x, num_groups, weight, bias, eps, silu)
    from diffrt.kernels.group_norm import group_norm as kernel

    return kernel(x, num_groups, weight, bias, eps, silu=silu)


def attention(q, k, v):
    """q [B, H, Sq, D], k/v [B, H, Sk, D] (the layers' layout) -> [B, H, Sq, D]; the kernel reads [B, S, H, D]
    views of the same memory, so no copy is made either way."""
    if not (q.device.type == _KERNEL_DEVICE and q.dtype in _ATTENTION_DTYPES and q.shape[-1] <= _MAX_HEAD_DIM):
        return _attention_torch(q, k, v)
    from diffrt.kernels.attention import attention as kernel

    return kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
