"""UNetConfig: the architecture of an SD-family UNet, read from diffusers' `unet/config.json`, with named presets."""

from dataclasses import dataclass
from typing import Any

# Supported block types -> whether the level has cross-attention (the model reads these too).
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_TYPES = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False, None: False}

Depth = int | tuple[int, ...]  # transformer blocks per Transformer2DModel: one for the level, or one per resnet


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an SD-family UNet (diffusers `unet/config.json`); per-level fields are normalised to tuples."""

    sample_size: int | tuple[int, int] | None = 64  # latent size it was trained at (image size / 8)
    in_channels: int = 4  # 9 for inpainting: latents + mask + masked-image latents
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down level; up levels have one more
    transformer_layers_per_block: Depth | tuple[Depth, ...] = 1  # per level (SDXL: 1, 2, 10)
    reverse_transformer_layers_per_block: tuple[Depth, ...] | None = None  # per up block; None mirrors the down path
    # Attention head COUNT per level; head width = channels // count. diffusers' configs store this count under the
    # name `attention_head_dim` (SD2/SDXL: 5, 10, 20 heads of 64; SD1: 8 heads of 40/80/160).
    num_attention_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768  # width of the text encoder's hidden states
    use_linear_projection: bool = False  # Transformer2DModel proj_in/out: 1x1 conv (SD1.x) or linear (SD2.x, SDXL)
    # Softmax in fp32 under fp16 (SD2.1-768 overflows without). Nothing in this module reads it: diffusers' default
    # SDPA processor ignores it as well, and fused attention kernels keep their softmax in fp32 anyway.
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5  # of the resnets' and the output's GroupNorms (attention's GroupNorm is fixed at 1e-6)
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    time_cond_proj_dim: int | None = None  # LCM: width of the guidance-scale embedding added before the time MLP
    addition_embed_type: str | None = None  # "text_time" (SDXL): pooled text embedding + sinusoidal time ids
    addition_time_embed_dim: int | None = None  # sinusoidal width of each time id
    projection_class_embeddings_input_dim: int | None = None  # pooled text width + n_time_ids * addition_time_embed_dim

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels is empty; the UNet needs at least one level")
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        for key in ("layers_per_block", "num_attention_heads", "transformer_layers_per_block"):
            object.__setattr__(self, key, _per_level(key, getattr(self, key), n))
        if self.reverse_transformer_layers_per_block is not None:
            key = "reverse_transformer_layers_per_block"
            object.__setattr__(self, key, _per_level(key, getattr(self, key), n))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self._check()

    def _check(self) -> None:
        n, ch = len(self.block_out_channels), self.block_out_channels
        _check_types("down_block_types", self.down_block_types, DOWN_TYPES, n)
        _check_types("up_block_types", self.up_block_types, UP_TYPES, n)
        if self.mid_block_type not in MID_TYPES:
            raise ValueError(f"mid_block_type {self.mid_block_type!r} is not supported; supported: {list(MID_TYPES)}")
        for c in ch:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {ch}: {c} is not a multiple of norm_num_groups={self.norm_num_groups}"
                )
        if min(self.layers_per_block) < 1:
            raise ValueError(f"layers_per_block {self.layers_per_block}: every level needs at least one resnet")
        for i in range(n):
            attn = DOWN_TYPES[self.down_block_types[i]] or UP_TYPES[self.up_block_types[n - 1 - i]]
            if (attn or (i == n - 1 and MID_TYPES[self.mid_block_type])) and ch[i] % self.num_attention_heads[i]:
                raise ValueError(
                    f"level {i}: {ch[i]} channels do not split into num_attention_heads={self.num_attention_heads[i]} "
                    "heads (diffusers configs call the head count attention_head_dim)"
                )
        down, rev = self.transformer_layers_per_block, self.reverse_transformer_layers_per_block
        for i, d in enumerate(down):
            if not isinstance(d, int):
                if rev is None:
                    raise ValueError(
                        f"transformer_layers_per_block {down} gives per-resnet depths; an asymmetric UNet like this "
                        "must also give reverse_transformer_layers_per_block (as diffusers requires)"
                    )
                if len(d) != self.layers_per_block[i]:
                    raise ValueError(f"transformer_layers_per_block[{i}]={d}: need {self.layers_per_block[i]} depths")
        for i, d in enumerate(rev or ()):
            if not isinstance(d, int) and len(d) != self.layers_per_block[n - 1 - i] + 1:
                need = self.layers_per_block[n - 1 - i] + 1
                raise ValueError(f"reverse_transformer_layers_per_block[{i}]={d}: up block {i} needs {need} depths")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"addition_embed_type {self.addition_embed_type!r} is not supported; None or 'text_time' (SDXL)"
            )
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                "addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim "
                f"(got {self.addition_time_embed_dim} and {self.projection_class_embeddings_input_dim})"
            )

    @property
    def family(self) -> str:
        """ "sd1" / "sd2" / "sdxl" by the families' structure: SDXL's added text/time conditioning, SD2's linear
        projections (SD1: 1x1-conv projections)."""
        if self.addition_embed_type == "text_time":
            return "sdxl"
        return "sd2" if self.use_linear_projection else "sd1"

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """Read a diffusers `unet/config.json` dict; missing keys take diffusers' defaults, as diffusers does."""
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ValueError(f"config is for {class_name!r}, not 'UNet2DConditionModel'")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown UNet2DConditionModel config keys {unknown}; known: {sorted(_DIFFUSERS_DEFAULTS)}"
            )
        c = {**_DIFFUSERS_DEFAULTS, **config}
        for key, allowed in _FIXED.items():
            values = c[key] if isinstance(c[key], (list, tuple)) else [c[key]]  # only_cross_attention may be per level
            if any(v not in allowed for v in values):
                raise ValueError(f"{key}={c[key]!r} is not supported; SD-family UNets use {allowed[0]!r}")
        if c["norm_num_groups"] is None:
            raise ValueError("norm_num_groups=None (no GroupNorm) is not supported; SD-family UNets use 32")
        cross = c["cross_attention_dim"]
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise ValueError(f"cross_attention_dim {cross}: a different text width per level is not supported")
            cross = cross[0]
        return cls(
            sample_size=c["sample_size"],
            in_channels=c["in_channels"],
            out_channels=c["out_channels"],
            down_block_types=c["down_block_types"],
            mid_block_type=c["mid_block_type"],
            up_block_types=c["up_block_types"],
            block_out_channels=c["block_out_channels"],
            layers_per_block=c["layers_per_block"],
            transformer_layers_per_block=c["transformer_layers_per_block"],
            reverse_transformer_layers_per_block=c["reverse_transformer_layers_per_block"],
            # diffusers' quirk: `attention_head_dim` holds the head COUNT unless `num_attention_heads` is given.
            num_attention_heads=c["num_attention_heads"] or c["attention_head_dim"],
            cross_attention_dim=cross,
            use_linear_projection=bool(c["use_linear_projection"]),
            upcast_attention=bool(c["upcast_attention"]),  # SDXL's config says null
            norm_num_groups=c["norm_num_groups"],
            norm_eps=c["norm_eps"],
            flip_sin_to_cos=c["flip_sin_to_cos"],
            freq_shift=c["freq_shift"],
            time_embedding_dim=c["time_embedding_dim"],
            time_cond_proj_dim=c["time_cond_proj_dim"],
            addition_embed_type=c["addition_embed_type"],
            addition_time_embed_dim=c["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"],
        )

    @classmethod
    def preset(cls, name: str) -> "UNetConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


def _per_level(key: str, value: Any, n: int) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{key}={value!r}: give one value, or one per level ({n} levels)")
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)


def _check_types(key: str, types: tuple[str, ...], allowed: dict, n: int) -> None:
    bad = sorted({t for t in types if t not in allowed})
    if bad:
        raise ValueError(f"{key} {list(types)}: block types {bad} are not supported; supported: {list(allowed)}")
    if len(types) != n:
        raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {n}; they must be equal")


def depths_per_layer(depth: Depth, count: int) -> tuple[int, ...]:
    return (depth,) * count if isinstance(depth, int) else depth


# diffusers' UNet2DConditionModel.__init__ defaults (0.42): what a config.json without the key means.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,  # inference only: ignored
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,  # only read by addition_embed_type "text", which is rejected
}

# Options of diffusers' UNet that no SD-family checkpoint changes: accepted only at these values (first is usual).
_FIXED: dict[str, tuple] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

PRESETS: dict[str, UNetConfig] = {
    # SD1.x: 8 heads at every level (40/80/160 wide), 1x1-conv projections, CLIP ViT-L/14 text (768).
    "sd15": UNetConfig(sample_size=64, num_attention_heads=8, cross_attention_dim=768),
    # SD2.x, 512 base and 768 v-prediction alike: 64-wide heads, linear projections, OpenCLIP ViT-H text (1024).
    "sd21": UNetConfig(
        sample_size=96,
        num_attention_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    # SDXL base: three levels, no attention at the first, 1/2/10 transformer blocks, CLIP-L + bigG text (2048),
    # pooled bigG (1280) + 6 time ids x 256 as added conditioning.
    "sdxl": UNetConfig(
        sample_size=128,
        down_block_types=_XL_DOWN,
        up_block_types=_XL_UP,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        num_attention_heads=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    # Test presets: every structural feature of the family above at 1/10 of the widths.
    "tiny-sd15": UNetConfig(
        sample_size=8,
        block_out_channels=(32, 64, 128, 128),
        norm_num_groups=8,
        num_attention_heads=8,
        cross_attention_dim=32,
    ),
    "tiny-sd21": UNetConfig(
        sample_size=8,
        block_out_channels=(32, 64, 128, 128),
        norm_num_groups=8,
        num_attention_heads=(2, 4, 8, 8),
        cross_attention_dim=48,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "tiny-sdxl": UNetConfig(
        sample_size=8,
        down_block_types=_XL_DOWN,
        up_block_types=_XL_UP,
        block_out_channels=(32, 64, 128),
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2, 3),
        num_attention_heads=(2, 4, 8),
        cross_attention_dim=32 + 40,  # tiny-clip-l + tiny-openclip-bigg hidden sizes, as 768 + 1280 in SDXL
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,  # tiny-openclip-bigg's pooled projection + 6 time ids
    ),
}
