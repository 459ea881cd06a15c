"""What each exported component is as a graph: the torch module traced, its named inputs and outputs, their dynamic
axes, sample inputs to trace and check with, and the shapes of its outputs for given inputs.

Names follow Optimum and the TensorRT demo where they agree (`input_ids`, `pooler_output`, `sample`, `timestep`,
`encoder_hidden_states`, `text_embeds`, `time_ids`) and Optimum where they differ (UNet -> `out_sample`, VAE decoder
`latent_sample` -> `sample`, VAE encoder `sample` -> `latent_parameters`). Spatial axes are the latents' (`height`,
`width`); images are `image_height` = 8 x height. The text encoder's `hidden_layer` input selects transformers'
`hidden_states[hidden_layer]`, which is how clip skip and SDXL's penultimate layer reach one graph.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffrt.models.clip import CLIPTextModel
from diffrt.models.taesd import AutoencoderTiny
from diffrt.models.unet import UNet2DConditionModel
from diffrt.models.vae import AutoencoderKL

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32", "float16", "bfloat16", "int32", "int64": torch's names
    dims: tuple[str | int, ...]  # a str names a dynamic axis, an int is fixed

    def as_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["dims"]))


@dataclass(frozen=True)
class GraphSpec:
    """One component's graph interface: what goes in and comes out, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, str) for d in t.dims)
        }

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Every output's shape once the inputs' shapes are known: each dynamic axis is bound by an input's axis of
        that name, or is 8x (VAE_SCALE) or 1/8 of a spatial one (image_height <-> height)."""
        bound: dict[str, int] = {}
        for t in self.inputs:
            for d, n in zip(t.dims, input_shapes[t.name], strict=True):
                if isinstance(d, str):
                    bound[d] = n
        for axis in ("height", "width"):  # the VAE's two sides of one scale
            if axis in bound:
                bound.setdefault(f"image_{axis}", bound[axis] * VAE_SCALE)
            elif f"image_{axis}" in bound:
                bound.setdefault(axis, bound[f"image_{axis}"] // VAE_SCALE)
        return {t.name: tuple(bound[d] if isinstance(d, str) else d for d in t.dims) for t in self.outputs}

    def as_json(self) -> dict:
        return {"inputs": [t.as_json() for t in self.inputs], "outputs": [t.as_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, d: dict) -> "GraphSpec":
        return cls(tuple(map(TensorSpec.from_json, d["inputs"])), tuple(map(TensorSpec.from_json, d["outputs"])))


VAE_SCALE = 8  # the SD family's VAE and TAESD: 2^3 per side


class TextEncoderGraph(nn.Module):
    """CLIP: input_ids [batch, sequence] int32, hidden_layer [] int64 -> hidden_states (transformers'
    hidden_states[hidden_layer], no final LayerNorm), normed_hidden_states (the same after final_layer_norm: with
    hidden_layer = num_hidden_layers, last_hidden_state), pooler_output (pooled last layer, projected if it has a
    projection)."""

    def __init__(self, clip: CLIPTextModel):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: Tensor, hidden_layer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tm = self.clip.text_model
        x = tm.embeddings(input_ids)
        states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            states.append(x)
        hidden = torch.stack(states).index_select(0, hidden_layer.reshape(1)).squeeze(0)
        return hidden, tm.final_layer_norm(hidden), self.clip.pool(tm.final_layer_norm(x), input_ids)


class UNetGraph(nn.Module):
    """The UNet with its optional inputs as positional ones, in the order of `UNetGraph.spec`."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        c = unet.config
        self.sdxl = c.addition_embed_type == "text_time"
        self.lcm = c.time_cond_proj_dim is not None

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, *extra: Tensor) -> Tensor:
        named = dict(zip(self.extra_names(), extra, strict=True))
        return self.unet(sample, timestep, encoder_hidden_states, **named)

    def extra_names(self) -> tuple[str, ...]:
        return ("text_embeds", "time_ids") * self.sdxl + ("timestep_cond",) * self.lcm


class VaeDecoderGraph(nn.Module):
    """latent_sample (unscaled latents) -> sample (images in about [-1, 1]), for AutoencoderKL and TAESD alike."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: Tensor) -> Tensor:
        return self.vae.decode(latent_sample)


class VaeEncoderGraph(nn.Module):
    """sample (images in [-1, 1]) -> AutoencoderKL: latent_parameters = mean and clamped log-variance concatenated
    along channels (Optimum's name and layout); TAESD: latent_sample (deterministic latents)."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, sample: Tensor) -> Tensor:
        encoded = self.vae.encode(sample)
        return torch.cat(list(encoded), dim=1) if isinstance(self.vae, AutoencoderKL) else encoded


def graph_module(component: str, module: nn.Module) -> nn.Module:
    if component.startswith("text_encoder"):
        return TextEncoderGraph(module)
    if component == "unet":
        return UNetGraph(module)
    return VaeDecoderGraph(module) if component == "vae_decoder" else VaeEncoderGraph(module)


def graph_spec(component: str, module: nn.Module, dtype: torch.dtype) -> GraphSpec:
    """The interface of `module` (the UNet, the VAE or a CLIP) exported as `component` in `dtype`."""
    dt = str(dtype).removeprefix("torch.")
    if component.startswith("text_encoder"):
        c = module.config
        pooled = c.projection_dim or c.hidden_size
        return GraphSpec(
            (TensorSpec("input_ids", "int32", ("batch", "sequence")), TensorSpec("hidden_layer", "int64", ())),
            (
                TensorSpec("hidden_states", dt, ("batch", "sequence", c.hidden_size)),
                TensorSpec("normed_hidden_states", dt, ("batch", "sequence", c.hidden_size)),
                TensorSpec("pooler_output", dt, ("batch", pooled)),
            ),
        )
    if component == "unet":
        c = module.config
        inputs = [
            TensorSpec("sample", dt, ("batch", c.in_channels, "height", "width")),
            TensorSpec("timestep", "float32", ()),
            TensorSpec("encoder_hidden_states", dt, ("batch", "sequence", c.cross_attention_dim)),
        ]
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            inputs += [TensorSpec("text_embeds", dt, ("batch", pooled)), TensorSpec("time_ids", dt, ("batch", 6))]
        if c.time_cond_proj_dim is not None:
            inputs.append(TensorSpec("timestep_cond", dt, ("batch", c.time_cond_proj_dim)))
        return GraphSpec(tuple(inputs), (TensorSpec("out_sample", dt, ("batch", c.out_channels, "height", "width")),))
    c = module.config
    latent = ("batch", c.latent_channels, "height", "width")
    image = ("batch", 3, "image_height", "image_width")
    if component == "vae_decoder":
        return GraphSpec((TensorSpec("latent_sample", dt, latent),), (TensorSpec("sample", dt, image),))
    if isinstance(module, AutoencoderKL):
        params = ("batch", 2 * c.latent_channels, "height", "width")
        return GraphSpec((TensorSpec("sample", dt, image),), (TensorSpec("latent_parameters", dt, params),))
    return GraphSpec((TensorSpec("sample", dt, image),), (TensorSpec("latent_sample", dt, latent),))


def sample_inputs(
    spec: GraphSpec, axes: dict[str, int], seed: int = 0, token_range: int = 1000, hidden_layer: int = 0
) -> dict[str, Tensor]:
    """Random inputs for `spec` with its dynamic axes set from `axes` (batch, sequence, height, width; image sides
    follow from the latent ones): what the export is traced with and checked at."""
    g = torch.Generator().manual_seed(seed)
    sizes = {**axes, "image_height": axes["height"] * VAE_SCALE, "image_width": axes["width"] * VAE_SCALE}
    out = {}
    for t in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.dims)
        if t.name == "input_ids":
            out[t.name] = torch.randint(0, token_range, shape, generator=g, dtype=torch.int32)
        elif t.name == "hidden_layer":
            out[t.name] = torch.tensor(hidden_layer, dtype=torch.int64)
        elif t.name == "timestep":
            out[t.name] = torch.tensor(500.0)
        elif t.name == "time_ids":
            side = [sizes["height"] * VAE_SCALE, sizes["width"] * VAE_SCALE]
            out[t.name] = torch.tensor([[*side, 0, 0, *side]] * shape[0], dtype=getattr(torch, t.dtype))
        else:
            out[t.name] = torch.randn(shape, generator=g).to(getattr(torch, t.dtype))
    return out
