"""The KL autoencoder of latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752), diffusers' names.

`AutoencoderKL.encode` maps an image in [-1, 1] to the parameters of a diagonal Gaussian over latents;
`AutoencoderKL.decode` maps latents back to an image. Neither applies `scaling_factor`: as in diffusers, the
pipeline multiplies encoder latents by it before the UNet and divides by it before decoding.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .layers import Downsample2D, GroupNorm, ResnetBlock2D, SpatialSelfAttention, Upsample2D

_EPS = 1e-6  # every GroupNorm of the VAE uses 1e-6 (diffusers hard-codes it; it is not in the config)


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture and latent scaling of an AutoencoderKL (diffusers `vae/config.json`)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    # UNet latents = encoder sample * scaling_factor (after subtracting shift_factor where it is set);
    # the pipeline applies it, not the model. 0.18215 for SD1.x/SD2.x, 0.13025 for SDXL.
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # None for the SD family; kept so that a config round-trips
    latents_mean: tuple[float, ...] | None = None  # per-channel statistics some VAEs use instead of the two above
    latents_std: tuple[float, ...] | None = None
    # The weights overflow in fp16 (SDXL's VAE does): the pipeline should run this VAE in fp32.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("block_out_channels", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; the VAE needs at least one level")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels}: {c} is not a multiple of "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block}; it must be at least 1")

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD/SDXL): one 2x downsample per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "AutoencoderKLConfig":
        """Read a diffusers `vae/config.json` dict; missing keys take diffusers' defaults, as diffusers does."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"config is for {class_name!r}, not 'AutoencoderKL'")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config keys {unknown}; supported: {sorted(_DIFFUSERS_KEYS)}")
        c = {**_DIFFUSERS_DEFAULTS, **config}
        n = len(c["block_out_channels"])
        _check_blocks("down_block_types", c["down_block_types"], "DownEncoderBlock2D", n)
        _check_blocks("up_block_types", c["up_block_types"], "UpDecoderBlock2D", n)
        if c["act_fn"] not in ("silu", "swish"):
            raise ValueError(f"act_fn {c['act_fn']!r} is not supported; the SD-family VAE uses 'silu'")
        return cls(
            block_out_channels=tuple(c["block_out_channels"]),
            layers_per_block=c["layers_per_block"],
            latent_channels=c["latent_channels"],
            norm_num_groups=c["norm_num_groups"],
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            scaling_factor=c["scaling_factor"],
            shift_factor=c["shift_factor"],
            latents_mean=c["latents_mean"],
            latents_std=c["latents_std"],
            force_upcast=c["force_upcast"],
            use_quant_conv=c["use_quant_conv"],
            use_post_quant_conv=c["use_post_quant_conv"],
            mid_block_add_attention=c["mid_block_add_attention"],
        )

    @classmethod
    def preset(cls, name: str) -> "AutoencoderKLConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown AutoencoderKL preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


# diffusers' AutoencoderKL.__init__ defaults: what a config.json without the key means.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,  # only sets diffusers' tile size for tiled decoding; not used here
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_DIFFUSERS_KEYS = frozenset(_DIFFUSERS_DEFAULTS)


def _check_blocks(key: str, types: Sequence[str], allowed: str, n: int) -> None:
    bad = sorted({t for t in types if t != allowed})
    if bad:
        raise ValueError(f"{key} {list(types)}: block types {bad} are not supported; only {allowed!r}")
    if len(types) != n:
        raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {n}; they must be equal")


PRESETS: dict[str, AutoencoderKLConfig] = {
    "sd": AutoencoderKLConfig(),  # SD1.x and SD2.x share one VAE architecture and scaling factor
    "sdxl": AutoencoderKLConfig(scaling_factor=0.13025),  # same architecture, retrained weights
    # Every structural feature of the real one (shortcut and plain resnets, 3 downsamples, mid attention,
    # quant convs) at a size that runs in milliseconds on a CPU.
    "tiny": AutoencoderKLConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
}


class LatentDistribution(NamedTuple):
    """The encoder's diagonal Gaussian, as diffusers' DiagonalGaussianDistribution (logvar clamped to [-30, 20])."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * noise, drawing the noise exactly as diffusers' `randn_tensor` does for the same generator(s)."""
        shape, device, dtype = self.mean.shape, self.mean.device, self.mean.dtype
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, list):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
            gen_device = generator[0].device
            noise = torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=gen_device, dtype=dtype) for g in generator]
            )
        else:
            gen_device = generator.device if generator is not None else device
            noise = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        return self.mean + self.std * noise.to(device)


class VAEMidBlock(nn.Module):
    """Resnet, single-head self-attention, resnet (diffusers' UNetMidBlock2D without a timestep embedding)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)])
        # nn.Identity holds no parameters, so the state_dict equals diffusers' (whose list then holds None).
        attention = SpatialSelfAttention(channels, groups, _EPS) if add_attention else nn.Identity()
        self.attentions = nn.ModuleList([attention])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
            for i in range(num_layers)
        )
        # The encoder pads (0, 1, 0, 1) then convolves without padding, as the original LDM code does.
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> Gaussian parameters [B, 2 * latent_channels, H / f, W / f], before quant_conv."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        ch, g, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block, g, add_downsample=i < n - 1)
            for i in range(n)
        )
        self.mid_block = VAEMidBlock(ch[-1], g, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS, silu=True)  # diffusers' conv_norm_out + conv_act, fused
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    """Latents [B, latent_channels, h, w] (after post_quant_conv) -> image [B, out_channels, h * f, w * f]."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        ch, g, n = config.block_out_channels[::-1], config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g, config.mid_block_add_attention)
        # One resnet more per level than the encoder, as in LDM and diffusers.
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, g, add_upsample=i < n - 1)
            for i in range(n)
        )
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS, silu=True)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    """SD/SDXL VAE; state_dict keys equal diffusers' AutoencoderKL's (encoder, decoder, quant_conv, post_quant_conv)."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """Image [B, 3, H, W] in [-1, 1] -> posterior over *unscaled* latents [B, 4, H/8, W/8].

        The pipeline then takes `.sample(generator)` or `.mode()` and computes the UNet's latents as
        `(z - shift_factor) * scaling_factor` (`z * scaling_factor` for SD/SDXL, whose shift_factor is None).
        """
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """*Unscaled* latents [B, 4, h, w] -> image [B, 3, 8h, 8w], nominally in [-1, 1] and not clamped (as diffusers).

        The pipeline passes `latents / scaling_factor` (`+ shift_factor` where that is set); postprocessing
        (`(x / 2 + 0.5).clamp(0, 1)`) is the pipeline's too.
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean, as diffusers' `forward(sample_posterior=False)`."""
        return self.decode(self.encode(x).mean)


_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the mid-block attention names of VAEs saved by diffusers < 0.14 (`query`, `key`, `value`, `proj_attn`,
    still found in e.g. the SD1.x repos) onto the current ones, as diffusers does when it loads them."""
    out = {}
    for key, value in state_dict.items():
        prefix, _, rest = key.rpartition(".mid_block.attentions.0.")
        if prefix and rest.split(".")[0] in _DEPRECATED_ATTENTION_NAMES:
            name, param = rest.split(".", 1)
            key = f"{prefix}.mid_block.attentions.0.{_DEPRECATED_ATTENTION_NAMES[name]}.{param}"
        out[key] = value
    return out
