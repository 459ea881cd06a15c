"""The cuda-graph backend: whole generations replayed from CUDA graphs, one graph per shape bucket.

The sampler loop and the decode of one plan are captured once per bucket (latent shape, sampler and schedule,
guidance on/off, the conditioning's shapes) and replayed for every call that falls in it: per call only the inputs
are copied into the graph's static buffers (starting latents, embeddings, the guidance scale, each step's fresh
noise, drawn from the call's generator in the eager order) and the outputs cloned out, so no launch or host work is
left between the steps. The text encoder is replayed from a graph per batch size too. The modules run on diffrt's
Triton kernels in channels-last memory (where both pay, benchmarks/NOTES_kernels.md). Buckets are kept per pipeline,
least recently used first out; `buckets()` reports what each holds in memory.
"""

from collections import OrderedDict

import torch
from torch import Tensor

from diffrt.backends.graphs import CapturedCall, device_lock, signature
from diffrt.backends.torch_roles import TorchControlNet, TorchDenoiser, TorchImageCodec, TorchTextEncoder
from diffrt.components import Components
from diffrt.control import ControlPlan
from diffrt.models.ops import TRITON_OPS, Ops, set_ops
from diffrt.plan import GenerationPlan, model_outputs
from diffrt.roles import Conditioning, Roles
from diffrt.samplers import Callback, NoiseSource, X0Predictor


class CudaGraphBackend:
    def __init__(self, ops: Ops = TRITON_OPS, channels_last: bool = True, max_buckets: int = 8) -> None:
        self.ops, self.channels_last, self.max_buckets = ops, channels_last, max_buckets
        self.name = "cuda-graph" if (ops is TRITON_OPS and channels_last) else f"cuda-graph[{ops.name}]"
        self._buckets: OrderedDict[tuple, _Bucket] = OrderedDict()

    def roles(self, components: Components, dtype: torch.dtype) -> Roles:
        device = next(components.unet.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"the {self.name} backend runs on a CUDA device, not {device}; use backend='torch'")
        for module in components.modules().values():  # the text encoders read only ops.fuse_projections
            set_ops(module, self.ops)
        if self.channels_last:
            for module in (components.unet, components.vae, *components.controlnets):
                module.to(memory_format=torch.channels_last)
        encoder = TorchTextEncoder(components.text_encoder, components.text_encoder_2)
        return Roles(
            text_encoder=GraphedTextEncoder(encoder, self.max_buckets),
            denoiser=TorchDenoiser(components.unet),
            codec=TorchImageCodec(components.vae, dtype),
            controlnets=tuple(TorchControlNet(c) for c in components.controlnets),
        )

    def run(self, plan: GenerationPlan, roles: Roles, callback: Callback | None = None) -> tuple[Tensor, Tensor]:
        key = (plan.bucket, signature(_flat(plan.cond)), plan.prediction_type)
        device = plan.latents.device
        with device_lock(device):
            bucket = self._buckets.pop(key, None) or _Bucket(plan, roles)
            self._buckets[key] = bucket  # most recently used last
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            images, latents = bucket(plan)
        if callback is not None:  # the steps ran inside one replay: report them once it is done
            for i in range(len(plan.schedule.timesteps)):
                callback(i, latents, latents)
        return images, latents

    def clear(self) -> None:
        """Drop every captured generation (after the modules' ops changed: a graph replays the kernels it was
        captured with); the next call of each bucket captures it again. Not to be called while generating."""
        self._buckets.clear()

    def buckets(self) -> list[dict]:
        """What each captured generation holds: its shapes, the memory its capture added and its replay count."""
        rows = []
        for (bucket, *_), captured in self._buckets.items():
            shape, sampler, schedule, cfg, *_ = bucket
            rows.append({"latents": shape, "sampler": sampler, "steps": len(schedule.timesteps), "cfg": cfg,
                         **captured.report()})  # fmt: skip
        return rows


class _Bucket:
    """One captured generation: static buffers for every per-call input, the sampler loop and the decode."""

    def __init__(self, plan: GenerationPlan, roles: Roles) -> None:
        device = plan.latents.device
        self.latents = plan.latents.clone()
        self.cond_fields = [_clone(v) for v in plan.cond.tensors().values()]
        self.cond_names = list(plan.cond.tensors())
        self.guidance = None
        if plan.guidance_scale is not None:  # a tensor, so that one graph serves every guidance scale
            self.guidance = torch.tensor(plan.guidance_scale, dtype=plan.latents.dtype, device=device)
        self.noise = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _noise_draws(plan)]
        cond = Conditioning(**dict(zip(self.cond_names, self.cond_fields, strict=True)))
        self.control = None
        if plan.control is not None:  # control images and per-step scales as static buffers too
            c = plan.control
            self.control = ControlPlan(tuple(image.clone() for image in c.images), c.scales.clone(), c.active)
        # The schedule's host tables are made here, outside the graph; the model's outputs are bound inside it,
        # where preparing the conditioning (the text's cross-attention keys and values, once for all the steps) is
        # recorded with the loop.
        model = X0Predictor(_bound_in_the_graph, plan.prediction_type, plan.schedule, device)

        def generation() -> tuple[Tensor, Tensor]:
            model.model_output = model_outputs(roles, cond, self.guidance, self.control)
            noise = _StaticNoise(self.noise)
            latents = plan.sampler.sample(model, self.latents, plan.schedule, noise, None, **plan.options)
            return plan.decode(roles.codec, latents), latents

        self.call = CapturedCall(generation, device)

    def __call__(self, plan: GenerationPlan) -> tuple[Tensor, Tensor]:
        self.latents.copy_(plan.latents)
        for static, value in zip(self.cond_fields, plan.cond.tensors().values(), strict=True):
            _copy(static, value)
        if self.guidance is not None:
            self.guidance.fill_(plan.guidance_scale)
        if self.control is not None:
            for static, image in zip(self.control.images, plan.control.images, strict=True):
                static.copy_(image)
            self.control.scales.copy_(plan.control.scales)
        for buffer in self.noise:  # the loop's fresh noise, in the order the eager loop draws it
            buffer.copy_(plan.noise.like(buffer))
        images, latents = self.call.replay()
        return images, latents

    def report(self) -> dict:
        statics = [self.latents, *_flat_list(self.cond_fields), *self.noise, *self.call.outputs]
        if self.control is not None:
            statics += [*self.control.images, self.control.scales]
        return {
            "pool_bytes": self.call.pool_bytes,
            "static_bytes": sum(t.numel() * t.element_size() for t in statics),
            "replays": self.call.replays,
        }


class GraphedTextEncoder:
    """The text-encoder role replayed from a graph per (batch, clip_skip): 77-token encodes are launch-bound."""

    def __init__(self, encoder: TorchTextEncoder, max_entries: int = 8) -> None:
        self.encoder, self.max_entries = encoder, max_entries
        self._graphs: OrderedDict[tuple, tuple[list[Tensor | None], CapturedCall]] = OrderedDict()

    def clear(self) -> None:
        """Drop every captured encode (as CudaGraphBackend.clear)."""
        self._graphs.clear()

    def __call__(
        self, ids: Tensor | None, ids_2: Tensor | None, clip_skip: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        device = (ids if ids is not None else ids_2).device
        key = (signature([ids, ids_2]), clip_skip)
        with device_lock(device):
            entry = self._graphs.pop(key, None)
            if entry is None:
                statics = [None if t is None else t.clone() for t in (ids, ids_2)]

                def encode() -> tuple[Tensor, ...]:
                    embeds, pooled = self.encoder(*statics, clip_skip)
                    return (embeds,) if pooled is None else (embeds, pooled)

                entry = (statics, CapturedCall(encode, device))
            self._graphs[key] = entry
            while len(self._graphs) > self.max_entries:
                self._graphs.popitem(last=False)
            statics, call = entry
            for static, value in zip(statics, (ids, ids_2), strict=True):
                if static is not None:
                    static.copy_(value)
            out = call.replay()
        return out[0], (out[1] if len(out) > 1 else None)


def _bound_in_the_graph(x: Tensor, t: Tensor) -> Tensor:
    raise AssertionError("the model's outputs are bound inside generation(), before the loop")


class _StaticNoise(NoiseSource):
    """Inside the graph: hands out the static noise buffers in draw order (filled before each replay)."""

    def __init__(self, buffers: list[Tensor]) -> None:
        super().__init__()
        self.buffers, self.drawn = buffers, 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self.buffers[self.drawn]
        assert tuple(buffer.shape) == tuple(shape) and buffer.dtype == dtype, "the loop drew other noise than counted"
        self.drawn += 1
        return buffer


class _CountedNoise(NoiseSource):
    """On the meta device: records the shape and dtype of every draw the loop makes."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        self.draws.append((tuple(shape), dtype))
        return torch.empty(shape, dtype=dtype, device="meta")


def _noise_draws(plan: GenerationPlan) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The loop's noise draws, counted by running it on the meta device (no data, no time) with a stand-in model."""
    counter = _CountedNoise()
    x = torch.empty(plan.latents.shape, dtype=plan.latents.dtype, device="meta")
    model = X0Predictor(lambda x_in, t: x_in, plan.prediction_type, plan.schedule, "meta")
    plan.sampler.sample(model, x, plan.schedule, counter, None, **plan.options)
    return counter.draws


def _flat(cond: Conditioning) -> list[Tensor]:
    return _flat_list(list(cond.tensors().values()))


def _flat_list(values: list) -> list[Tensor]:
    return [t for v in values for t in (v if isinstance(v, tuple) else (v,))]


def _clone(value: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    return tuple(t.clone() for t in value) if isinstance(value, tuple) else value.clone()


def _copy(static: Tensor | tuple[Tensor, ...], value: Tensor | tuple[Tensor, ...]) -> None:
    for s, v in zip(*((static, value) if isinstance(static, tuple) else ((static,), (value,))), strict=True):
        s.copy_(v)
