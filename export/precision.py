"""The fragile ops in fp32 inside an fp16 (or bf16) graph: softmax, and the statistics of GroupNorm and LayerNorm.

A half-precision softmax over 77 or 4096 keys and a half-precision variance over a whole GroupNorm group lose digits
or overflow (SD2.1-768's attention does; the SDXL VAE overflows wholesale and is exported in fp32 instead). Torch's
own CUDA kernels compute these in fp32 internally, so an fp16 torch module is accurate; an exported graph has only
what it spells out. `fragile_ops_in_fp32()` is a TorchFunctionMode active while tracing: it routes every
scaled_dot_product_attention, group_norm and layer_norm call of any module (our UNet, VAE and CLIP alike, no model
code changed) to the versions below, which cast up around exactly those ops. In an fp32 graph the casts vanish and
the attention is the same MatMul-Softmax-MatMul pattern, so fp32 and fp16 graphs have one structure.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def attention_fp32_softmax(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """softmax(q k^T * scale) v with the scores and softmax in fp32; q is scaled before the product so that
    half-precision scores cannot overflow (Vaswani et al. 2017, eq. 1)."""
    if dropout_p or enable_gqa:
        raise ValueError("the export's attention takes no dropout and no grouped-query attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = ((q * scale) @ k.transpose(-2, -1)).float()
    if is_causal:  # each token sees itself and the ones before (CLIP's text transformer)
        n = scores.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1).to(v.dtype) @ v


def group_norm_fp32(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    weight, bias = (None if t is None else t.float() for t in (weight, bias))
    return F.group_norm(x.float(), num_groups, weight, bias, eps).to(x.dtype)


def layer_norm_fp32(
    x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    weight, bias = (None if t is None else t.float() for t in (weight, bias))
    return F.layer_norm(x.float(), normalized_shape, weight, bias, eps).to(x.dtype)


_REPLACEMENTS = {
    F.scaled_dot_product_attention: attention_fp32_softmax,
    F.group_norm: group_norm_fp32,
    F.layer_norm: layer_norm_fp32,
}


class fragile_ops_in_fp32(TorchFunctionMode):  # lower case: it reads as a context manager
    """`with fragile_ops_in_fp32(): torch.onnx.export(...)`. Inside the handler the mode is off, so the replacements'
    own F.group_norm / F.layer_norm calls run the real ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _REPLACEMENTS.get(func, func)(*args, **(kwargs or {}))
