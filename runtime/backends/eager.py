"""The eager backend: diffrt's torch modules run op by op, on the kernels its `ops` name (diffrt.models.ops)."""

import torch
from torch import Tensor

from diffrt.backends.torch_roles import TorchControlNet, TorchDenoiser, TorchImageCodec, TorchTextEncoder
from diffrt.components import Components
from diffrt.models.ops import Ops, set_ops
from diffrt.plan import GenerationPlan, run_plan
from diffrt.roles import Roles
from diffrt.samplers import Callback


class EagerBackend:
    """Torch eager on `ops`: TORCH_OPS is the reference ("torch"); TRITON_OPS puts every GroupNorm(+SiLU) and
    attention on diffrt's fused kernels ("triton"; they pay most inside CUDA graphs, where launches cost nothing)."""

    def __init__(self, name: str, ops: Ops) -> None:
        self.name, self.ops = name, ops

    def roles(self, components: Components, dtype: torch.dtype) -> Roles:
        for module in components.modules().values():  # the text encoders read only ops.fuse_projections
            set_ops(module, self.ops)
        return Roles(
            text_encoder=TorchTextEncoder(components.text_encoder, components.text_encoder_2),
            denoiser=TorchDenoiser(components.unet),
            codec=TorchImageCodec(components.vae, dtype),
            controlnets=tuple(TorchControlNet(c) for c in components.controlnets),
        )

    def run(self, plan: GenerationPlan, roles: Roles, callback: Callback | None = None) -> tuple[Tensor, Tensor]:
        return run_plan(plan, roles, callback)

    def __repr__(self) -> str:
        return f"EagerBackend({self.name!r}, ops={self.ops.name!r})"
