"""Every GroupNorm and attention shape of the SD1.5, SD2.1 and SDXL UNets (and the SD VAE decoder), batch 1.

Derived by walking diffusers' UNet2DConditionModel / AutoencoderKL structure from the fields of each model's
config.json that matter here, so the list cannot drift from a hand-typed table. The tests (tests/test_group_norm.py,
tests/test_attention.py) and benchmarks/kernels.py both use it.
"""

from collections import Counter
from dataclasses import dataclass

# The fields of the diffusers configs (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0) that fix the norm and attention shapes. In diffusers'
# UNet2DConditionModel, `attention_head_dim` holds the number of heads when num_attention_heads is unset.
UNET_CONFIGS = {
    "sd15": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "transformer_layers_per_block": 1,
        "norm_num_groups": 32,
        "context_length": 77,
    },
    "sd21": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20, 20),
        "transformer_layers_per_block": 1,
        "norm_num_groups": 32,
        "context_length": 77,
    },
    "sdxl": {
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "norm_num_groups": 32,
        "context_length": 77,
    },
}
RESOLUTIONS = (512, 1024)


@dataclass(frozen=True)
class GroupNormShape:
    channels: int
    height: int
    width: int
    groups: int
    eps: float
    silu: bool

    @property
    def label(self) -> str:
        return f"C{self.channels}_{self.height}x{self.width}_g{self.groups}{'_silu' if self.silu else ''}"


@dataclass(frozen=True)
class AttentionShape:
    seq_q: int
    seq_k: int
    heads: int
    head_dim: int

    @property
    def label(self) -> str:
        kind = "self" if self.seq_q == self.seq_k else "cross"
        return f"{kind}_q{self.seq_q}_k{self.seq_k}_h{self.heads}_d{self.head_dim}"


def _per_block(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def unet_shapes(model: str, resolution: int) -> tuple[Counter, Counter]:
    """(GroupNormShape -> count, AttentionShape -> count) for one UNet forward at batch 1."""
    cfg = UNET_CONFIGS[model]
    boc = cfg["block_out_channels"]
    nblocks = len(boc)
    heads = _per_block(cfg["attention_head_dim"], nblocks)
    layers = _per_block(cfg["transformer_layers_per_block"], nblocks)
    groups, ctx = cfg["norm_num_groups"], cfg["context_length"]
    norms, attns = Counter(), Counter()

    def resnet(cin, cout, res):
        norms[GroupNormShape(cin, res, res, groups, 1e-5, True)] += 1  # norm1 -> SiLU -> conv1
        norms[GroupNormShape(cout, res, res, groups, 1e-5, True)] += 1  # norm2 (+ time embedding) -> SiLU -> conv2

    def transformer(ch, res, nheads, nlayers):
        norms[GroupNormShape(ch, res, res, groups, 1e-6, False)] += 1  # Transformer2DModel.norm, no activation
        for _ in range(nlayers):
            attns[AttentionShape(res * res, res * res, nheads, ch // nheads)] += 1  # attn1: self
            attns[AttentionShape(res * res, ctx, nheads, ch // nheads)] += 1  # attn2: cross, text tokens

    res = resolution // 8
    ch = boc[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        for _ in range(cfg["layers_per_block"]):
            resnet(ch, boc[i], res)
            ch = boc[i]
            if kind.startswith("CrossAttn"):
                transformer(ch, res, heads[i], layers[i])
        if i < nblocks - 1:
            res //= 2
    resnet(ch, ch, res)
    transformer(ch, res, heads[-1], layers[-1])
    resnet(ch, ch, res)
    rev_boc, rev_heads, rev_layers = boc[::-1], heads[::-1], layers[::-1]
    prev = rev_boc[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        out, skip_in = rev_boc[i], rev_boc[min(i + 1, nblocks - 1)]
        for j in range(cfg["layers_per_block"] + 1):
            skip = skip_in if j == cfg["layers_per_block"] else out
            resnet((prev if j == 0 else out) + skip, out, res)
            if kind.startswith("CrossAttn"):
                transformer(out, res, rev_heads[i], rev_layers[i])
        prev = out
        if i < nblocks - 1:
            res *= 2
    norms[GroupNormShape(boc[0], res, res, groups, 1e-5, True)] += 1  # conv_norm_out -> SiLU -> conv_out
    return norms, attns


def vae_decoder_norm_shapes(resolution: int) -> Counter:
    """GroupNorm shapes of the SD/SDXL VAE decoder (block_out_channels 128, 256, 512, 512; 3 resnets per up block).

    Its mid-block attention (1 head of dim 512) is outside the attention kernel's head-dim range and not listed.
    """
    boc, groups, eps = (128, 256, 512, 512), 32, 1e-6
    norms = Counter()
    res = resolution // 8

    def resnet(cin, cout, r):
        norms[GroupNormShape(cin, r, r, groups, eps, True)] += 1
        norms[GroupNormShape(cout, r, r, groups, eps, True)] += 1

    resnet(512, 512, res)
    norms[GroupNormShape(512, res, res, groups, eps, False)] += 1  # mid attention's group norm
    resnet(512, 512, res)
    prev = 512
    for i, out in enumerate(boc[::-1]):
        for j in range(3):
            resnet(prev if j == 0 else out, out, res)
            prev = out
        if i < len(boc) - 1:
            res *= 2
    norms[GroupNormShape(128, res, res, groups, eps, True)] += 1  # conv_norm_out -> SiLU
    return norms


def all_unet_shapes() -> tuple[dict, dict]:
    """Unique shapes over SD1.5/SD2.1/SDXL at 512² and 1024²: {shape: ["sd15@512 x4", ...]} for norms and attention."""
    norms, attns = {}, {}
    for model in UNET_CONFIGS:
        for res in RESOLUTIONS:
            n, a = unet_shapes(model, res)
            for shape, count in n.items():
                norms.setdefault(shape, []).append(f"{model}@{res} x{count}")
            for shape, count in a.items():
                attns.setdefault(shape, []).append(f"{model}@{res} x{count}")
    return norms, attns


def all_vae_norm_shapes() -> dict:
    norms = {}
    for res in RESOLUTIONS:
        for shape, count in vae_decoder_norm_shapes(res).items():
            norms.setdefault(shape, []).append(f"vae@{res} x{count}")
    return norms


# Cross-attention with 154 keys (two 77-token prompt chunks) at the UNet's self-attention shapes.
def long_prompt_shapes() -> list[AttentionShape]:
    _, attns = all_unet_shapes()
    return sorted({AttentionShape(s.seq_q, 154, s.heads, s.head_dim) for s in attns if s.seq_k == 77}, key=str)
