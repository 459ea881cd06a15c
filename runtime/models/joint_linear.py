"""Linear layers that read the same input, computed by one matrix product in inference: attention's q, k and v
projections (k and v alone for cross-attention), their weights kept as row blocks of one joint tensor.

At batch 1 the UNet's projections are small GEMMs (M = the tokens, N = the channels) that leave most of the GPU idle
and cost a launch each; one GEMM of N = 3C does the same work in one (benchmarks/NOTES_kernels.md, run 10).

The layers stay what checkpoints, state dicts, LoRA and training see. Each layer's weight (and bias) becomes a view
into the joint tensor, so loading a state dict and LoRA's in-place copies (diffrt.lora) write into it, and a CUDA
graph that reads it sees their changes. A parameter replaced outright (Module.to into another dtype or device,
load_state_dict(assign=True)) breaks the link: the next call notices and rebuilds the joint tensor, except while a
CUDA graph is being captured (a rebuild there would be recorded into the graph), where the layers run one by one.
With gradients on (training) they also run one by one, so that each parameter gets its own gradient.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class JointLinear:
    """`JointLinear(a, b, c)(x)` == `(a(x), b(x), c(x))`, in one GEMM where it can."""

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.sizes = [layer.out_features for layer in linears]
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        # one GEMM needs one bias convention: all layers with a bias, or none
        self.joinable = len({layer.bias is None for layer in linears}) == 1

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        if not self._joins(x):
            return tuple(layer(x) for layer in self.linears)
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def unsplit(self, x: Tensor) -> Tensor:
        """The layers' outputs side by side on the last dimension (out_features of each, in order), one GEMM where
        it can."""
        if not self._joins(x):
            return torch.cat([layer(x) for layer in self.linears], dim=-1)
        return F.linear(x, self.weight, self.bias)

    def _joins(self, x: Tensor) -> bool:
        return self.joinable and not torch.is_grad_enabled() and self._ready(x)

    def release(self) -> None:
        """Drop the joint tensors (the layers' weights have become views of another joint, which now holds them);
        the next call joins again if it needs to."""
        self.weight = self.bias = None

    def _ready(self, x: Tensor) -> bool:
        if self._linked():
            return True
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        self._join()
        return True

    def _linked(self) -> bool:
        """Whether every layer's parameters are still views into the joint tensors."""
        if self.weight is None:
            return False
        for layer in self.linears:
            for param, joint in ((layer.weight, self.weight), (layer.bias, self.bias)):
                if param is not None and (
                    param.untyped_storage().data_ptr() != joint.untyped_storage().data_ptr()
                    or param.dtype != joint.dtype
                ):
                    return False
        return True

    @torch.inference_mode(False)  # the joint tensor is a parameter's storage: never an inference tensor, which
    @torch.no_grad()  # later in-place writes outside inference mode (load_state_dict, LoRA) could not touch
    def _join(self) -> None:
        layers = self.linears
        self.weight = torch.cat([layer.weight for layer in layers])
        self.bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        for layer, weight in zip(layers, self.weight.split(self.sizes), strict=True):
            layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        if self.bias is not None:
            for layer, bias in zip(layers, self.bias.split(self.sizes), strict=True):
                layer.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
