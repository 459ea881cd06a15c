"""The roles on exported graphs: a UNet, a VAE and CLIP text encoders each run by a `GraphRunner` (an ONNX Runtime
session, a TensorRT engine), with the torch modules' call signatures so that the torch roles wrap them unchanged:

    TorchDenoiser(GraphUNet(run, spec))            the same Conditioning -> UNet-argument mapping as for the module
    TorchImageCodec(GraphVae(enc, dec, config), latent_dtype, vae_dtype)   the same scaling, shift and posterior
    GraphTextEncoder({"text_encoder": run, ...}, configs)                    diffusers' encode_prompt combination

A runner maps {input name: tensor} to {output name: tensor} on the pipeline's device; the graphs' interfaces are
diffrt.export.graphs'. Inputs are cast to each graph input's dtype, outputs back to the caller's.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffrt.backends.torch_roles import TorchDenoiser, TorchImageCodec
from diffrt.export.graphs import GraphSpec
from diffrt.models.clip import CLIPTextConfig
from diffrt.models.text_conditioning import check_clip_skip, deepest_clip_skip
from diffrt.models.vae import LatentDistribution
from diffrt.roles import Roles

GraphRunner = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def graph_roles(model, make_runner: Callable[[str], GraphRunner], device, dtype: torch.dtype) -> Roles:
    """The three roles over an opened export (diffrt.export.exported.ExportedModel), each graph run by
    `make_runner(component)`; latents and embeddings in `dtype`, the VAE in the dtype it was exported in."""
    present = set(model.paths)
    encoders = {n: make_runner(n) for n in ("text_encoder", "text_encoder_2") if n in present}
    encoder = "vae_encoder" in present
    vae = GraphVae(make_runner("vae_encoder") if encoder else None, make_runner("vae_decoder"),
                   model.graph("vae_encoder") if encoder else None, model.graph("vae_decoder"),
                   model.config("vae_decoder"))  # fmt: skip
    return Roles(
        text_encoder=GraphTextEncoder(encoders, {n: model.config(n) for n in encoders}, dtype, device),
        denoiser=TorchDenoiser(GraphUNet(make_runner("unet"), model.graph("unet"))),
        codec=TorchImageCodec(vae, dtype, vae_dtype=getattr(torch, model.dtype("vae_decoder"))),
    )


def feeds_for(spec: GraphSpec, values: dict[str, Tensor | None]) -> dict[str, Tensor]:
    """The graph's inputs from `values`, each in the graph's dtype; a missing or an unexpected one is an error."""
    names = {t.name for t in spec.inputs}
    extra = sorted(k for k, v in values.items() if v is not None and k not in names)
    if extra:
        raise ValueError(f"this exported graph has no input {extra}; it takes {sorted(names)}")
    missing = sorted(n for n in names if values.get(n) is None)
    if missing:
        raise ValueError(f"this exported graph needs {missing}, which were not given")
    return {t.name: values[t.name].to(getattr(torch, t.dtype)) for t in spec.inputs}


class GraphUNet:
    """Called like UNet2DConditionModel.forward (what TorchDenoiser calls)."""

    def __init__(self, run: GraphRunner, spec: GraphSpec):
        self.run, self.spec = run, spec

    def __call__(
        self,
        sample: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        text_embeds: Tensor | None = None,
        time_ids: Tensor | None = None,
        timestep_cond: Tensor | None = None,
        down_block_additional_residuals: Sequence[Tensor] | None = None,
        mid_block_additional_residual: Tensor | None = None,
    ) -> Tensor:
        if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            raise ValueError("exported UNets take no ControlNet residuals; run ControlNet on the torch backend")
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(())
        values = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                  "text_embeds": text_embeds, "time_ids": time_ids, "timestep_cond": timestep_cond}  # fmt: skip
        return self.run(feeds_for(self.spec, values))["out_sample"].to(sample.dtype)


class GraphVae:
    """AutoencoderKL's / AutoencoderTiny's encode and decode (what TorchImageCodec calls), and their config."""

    def __init__(self, encoder: GraphRunner | None, decoder: GraphRunner, encoder_spec: GraphSpec | None,
                 decoder_spec: GraphSpec, config) -> None:  # fmt: skip
        self.encoder, self.decoder, self.encoder_spec, self.decoder_spec = encoder, decoder, encoder_spec, decoder_spec
        self.config = config

    def encode(self, x: Tensor) -> LatentDistribution | Tensor:
        if self.encoder is None:
            raise ValueError("this export has no vae_encoder, so it cannot encode images (img2img); export it too")
        out = self.encoder(feeds_for(self.encoder_spec, {"sample": x}))
        if "latent_parameters" in out:  # KL: mean and clamped log-variance, as AutoencoderKL.encode returns them
            return LatentDistribution(*out["latent_parameters"].to(x.dtype).chunk(2, dim=1))
        return out["latent_sample"].to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(feeds_for(self.decoder_spec, {"latent_sample": z}))["sample"].to(z.dtype)


class GraphTextEncoder:
    """The text-encoder role on exported CLIP graphs: diffusers' encode_prompt, as diffrt.models.text_conditioning
    computes it from the modules (SD: last_hidden_state, or with clip skip N the normed output N layers before the
    last; SDXL: both encoders' penultimate-minus-clip-skip raw states concatenated, the second's pooled output)."""

    def __init__(
        self, runs: dict[str, GraphRunner], configs: dict[str, CLIPTextConfig], dtype: torch.dtype, device
    ) -> None:
        self.runs, self.configs, self.dtype, self.device = runs, configs, dtype, torch.device(device)
        self.sdxl = "text_encoder_2" in runs
        self.deepest = deepest_clip_skip(configs.get("text_encoder"), configs.get("text_encoder_2"))

    def _encode(self, name: str, ids: Tensor, hidden_layer: int) -> dict[str, Tensor]:
        layer = torch.tensor(hidden_layer % (self.configs[name].num_hidden_layers + 1), device=self.device)
        out = self.runs[name]({"input_ids": ids.to(self.device, torch.int32), "hidden_layer": layer})
        return {k: v.to(self.dtype) for k, v in out.items()}

    def __call__(
        self, ids: Tensor | None, ids_2: Tensor | None, clip_skip: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        check_clip_skip(clip_skip, self.deepest)
        if not self.sdxl:
            out = self._encode("text_encoder", ids, -((clip_skip or 0) + 1))  # clip skip 0 or None: the last layer
            return out["normed_hidden_states"], None
        layer = -((clip_skip or 0) + 2)
        second = self._encode("text_encoder_2", ids_2, layer)
        states = [second["hidden_states"]]
        if "text_encoder" in self.runs:
            states.insert(0, self._encode("text_encoder", ids, layer)["hidden_states"])
        return torch.cat(states, dim=-1), second["pooler_output"]
