"""Tiny AutoEncoder for Stable Diffusion (TAESD / TAESDXL, Boer Bohan 2023, https://github.com/madebyollin/taesd).

A distilled stand-in for the KL VAE: plain 3x3 convolutions and ReLU, no normalization or attention.
State_dict keys equal diffusers' `AutoencoderTiny` (`encoder.layers.*`, `decoder.layers.*`). TAESD's latents live
in the UNet's latent scale already (its diffusers config says `scaling_factor` 1.0, `shift_factor` 0.0), so the
pipeline's usual `latents / scaling_factor + shift_factor` before `decode` is a no-op for it.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.models.ops import TORCH_OPS

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
}
_UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")


@dataclass(frozen=True)
class TAESDConfig:
    """Architecture and latent scaling of an AutoencoderTiny (diffusers `config.json`)."""

    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # per level: (stride-2 conv unless first), then N blocks
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # per level: N blocks, then (upsample unless last), conv
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    upsampling_scaling_factor: int = 2
    # scale_latents/unscale_latents map raw latents to [0, 1] and back (x / (2 * magnitude) + shift), for
    # storing latents as 8-bit images; decode/encode do not use them.
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    scaling_factor: float = 1.0  # the pipeline's latents / scaling_factor + shift_factor before decode: identity
    shift_factor: float = 0.0
    force_upcast: bool = False  # runs fine in fp16

    def __post_init__(self):
        for name in (
            "encoder_block_out_channels",
            "decoder_block_out_channels",
            "num_encoder_blocks",
            "num_decoder_blocks",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for side in ("encoder", "decoder"):
            channels, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(channels) != len(blocks) or not channels:
                raise ValueError(
                    f"{side}_block_out_channels {channels} and num_{side}_blocks {blocks} must be equally long, "
                    "with at least one level"
                )
            # diffusers' EncoderTiny/DecoderTiny feed level i-1's output into level i's convs built for level i's
            # width, so only equal widths run there; a checkpoint with unequal ones cannot exist.
            if len(set(channels)) != 1:
                raise ValueError(
                    f"{side}_block_out_channels {channels}: AutoencoderTiny needs one width for all levels"
                )
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
        if self.upsample_fn not in _UPSAMPLE_MODES:
            raise ValueError(
                f"upsample_fn {self.upsample_fn!r} is not supported; choose one of {list(_UPSAMPLE_MODES)}"
            )

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for TAESD): a stride-2 conv per level but the first."""
        return 2 ** (len(self.num_encoder_blocks) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "TAESDConfig":
        """Read a diffusers AutoencoderTiny `config.json` dict; missing keys take diffusers' defaults."""
        class_name = config.get("_class_name", "AutoencoderTiny")
        if class_name != "AutoencoderTiny":
            raise ValueError(f"config is for {class_name!r}, not 'AutoencoderTiny'")
        # diffusers writes `block_out_channels` (a copy of decoder_block_out_channels) into the config it saves.
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
        unknown = [k for k in unknown if k != "block_out_channels"]
        if unknown:
            raise ValueError(
                f"unsupported AutoencoderTiny config keys {unknown}; supported: {sorted(_DIFFUSERS_DEFAULTS)}"
            )
        c = {**_DIFFUSERS_DEFAULTS, **config}
        c["force_upcast"] = False  # diffusers overrides whatever the file says
        return cls(**{k: c[k] for k in _DIFFUSERS_DEFAULTS})

    @classmethod
    def preset(cls, name: str) -> "TAESDConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown TAESD preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


# diffusers' AutoencoderTiny.__init__ defaults: what a config.json without the key means.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (64, 64, 64, 64),
    "decoder_block_out_channels": (64, 64, 64, 64),
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": (1, 3, 3, 3),
    "num_decoder_blocks": (3, 3, 3, 1),
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}

PRESETS: dict[str, TAESDConfig] = {
    "taesd": TAESDConfig(),  # SD1.x/SD2.x latents
    "taesdxl": TAESDConfig(),  # SDXL latents: same architecture and latent API, other weights
    # Same layer pattern (strided convs, 3-conv residual blocks, upsamples, biased last conv), 16 wide, 1 block a level.
    "tiny": TAESDConfig((16,) * 4, (16,) * 4, (1, 1, 1, 1), (1, 1, 1, 1)),
}


def _conv(ops, conv: nn.Conv2d, x: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None):
    """relu(conv(x) [+ residual]); with ops.taesd_epilogues a biased convolution runs without its bias and one
    bias_add pass adds it, the residual and the ReLU (torch adds a channels-last bias on its slow broadcasting path,
    benchmarks/NOTES_kernels.md run 8, then the residual and the ReLU a pass each)."""
    if ops.taesd_epilogues and conv.bias is not None:
        return ops.bias_add(conv._conv_forward(x, conv.weight, None), conv.bias, residual, 1.0, relu)
    y = conv(x)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _run(ops, layers, x: torch.Tensor) -> torch.Tensor:
    """`layers` in turn; with ops.taesd_epilogues a convolution and the ReLU after it as one epilogue (_conv), and
    nearest 2x upsampling on ops.upsample_nearest; with ops.upsample_conv an upsampling and the unbiased 3x3
    convolution after it at the input's resolution (as the KL VAE's Upsample2D)."""
    layers = list(layers)
    i = 0
    while i < len(layers):
        layer = layers[i]
        fused_relu = ops.taesd_epilogues and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
        if isinstance(layer, nn.Conv2d):
            x = _conv(ops, layer, x, relu=fused_relu)
            i += 2 if fused_relu else 1
            continue
        nearest_2x = isinstance(layer, nn.Upsample) and layer.mode == "nearest" and layer.scale_factor in (2, 2.0)
        after = layers[i + 1] if i + 1 < len(layers) else None
        if ops.upsample_conv is not None and nearest_2x and _is_plain_3x3(after) and after.bias is None:
            x = ops.upsample_conv(x, after)
            i += 2
            continue
        x = ops.upsample_nearest(x, None) if ops.taesd_epilogues and nearest_2x else layer(x)
        i += 1
    return x


def _is_plain_3x3(layer) -> bool:
    return isinstance(layer, nn.Conv2d) and (layer.kernel_size, layer.stride, layer.padding, layer.groups) == (
        (3, 3), (1, 1), (1, 1), 1)  # fmt: skip


class AutoencoderTinyBlock(nn.Module):
    """act(conv-act-conv-act-conv(x) + skip(x)); diffusers names: conv.{0,2,4}, skip, fuse."""

    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        act = _ACTIVATIONS[act_fn]
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            act(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            act(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()
        )
        self.fuse = nn.ReLU()  # ReLU whatever act_fn is, as in diffusers and the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ops.taesd_epilogues:
            return self.fuse(self.conv(x) + self.skip(x))
        h = _run(self.ops, self.conv[:-1], x)
        return _conv(self.ops, self.conv[-1], h, relu=True, residual=self.skip(x))  # fuse is a ReLU


class EncoderTiny(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> latents [B, latent_channels, H / 8, W / 8] in the UNet's scale."""

    ops = TORCH_OPS

    def __init__(self, config: TAESDConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (ch, n) in enumerate(zip(config.encoder_block_out_channels, config.num_encoder_blocks, strict=True)):
            if i == 0:
                layers.append(nn.Conv2d(config.in_channels, ch, 3, padding=1))
            else:
                layers.append(nn.Conv2d(ch, ch, 3, padding=1, stride=2, bias=False))
            layers += [AutoencoderTinyBlock(ch, ch, config.act_fn) for _ in range(n)]
        layers.append(nn.Conv2d(config.encoder_block_out_channels[-1], config.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.ops, self.layers, x.add(1).div(2))  # TAESD itself works on images in [0, 1]


class DecoderTiny(nn.Module):
    """Latents in the UNet's scale -> image in [-1, 1] (not clamped; the latents are soft-clamped to (-3, 3))."""

    ops = TORCH_OPS

    def __init__(self, config: TAESDConfig):
        super().__init__()
        channels, counts = config.decoder_block_out_channels, config.num_decoder_blocks
        layers: list[nn.Module] = [
            nn.Conv2d(config.latent_channels, channels[0], 3, padding=1),
            _ACTIVATIONS[config.act_fn](),
        ]
        for i, (ch, n) in enumerate(zip(channels, counts, strict=True)):
            last = i == len(channels) - 1
            layers += [AutoencoderTinyBlock(ch, ch, config.act_fn) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=config.upsampling_scaling_factor, mode=config.upsample_fn))
            layers.append(nn.Conv2d(ch, config.out_channels if last else ch, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x / 3) * 3  # smooth clamp of outlying latents, as TAESD's own Clamp module
        return _run(self.ops, self.layers, x).mul(2).sub(1)  # TAESD outputs [0, 1]; diffusers' convention is [-1, 1]


class AutoencoderTiny(nn.Module):
    """TAESD / TAESDXL with diffusers' AutoencoderTiny state_dict keys and encode/decode conventions."""

    def __init__(self, config: TAESDConfig):
        super().__init__()
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/8, W/8], deterministic (no distribution to sample).

        Like diffusers' `AutoencoderTiny.encode(x).latents`; the pipeline's `* scaling_factor` (1.0) leaves them as is.
        """
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, h, w] -> image [B, 3, 8h, 8w], nominally in [-1, 1] and not clamped (as diffusers).

        The input passes through tanh(z / 3) * 3 first, so latents far outside (-3, 3) are squashed, not wrapped.
        """
        return self.decoder(z)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> [0, 1] (clamped), for storing them as 8-bit images."""
        return z.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> raw latents; the inverse of scale_latents inside its unclamped range."""
        return z.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Round trip through 8-bit latents, as diffusers' AutoencoderTiny.forward."""
        z = self.scale_latents(self.encode(x)).mul(255).round().byte()
        return self.decode(self.unscale_latents(z / 255.0))
