"""CLIP text encoders (Radford et al. 2021) with transformers' parameter names: CLIP ViT-L/14 (SD1.x and SDXL's first
encoder), OpenCLIP ViT-H (SD2.x) and OpenCLIP ViT-bigG (SDXL's second encoder, with its text projection).

A pre-LayerNorm transformer with a causal mask over 77 positions. `state_dict()` keys are those of transformers'
CLIPTextModelWithProjection and of every CLIPTextModel file saved before transformers 5 (`text_model.embeddings.*`,
`text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`, plus `text_projection.weight` when the config has
a projection); transformers 5 saves CLIPTextModel without the `text_model.` level, which the loader adds back.
"""

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.models.joint_linear import JointLinear
from diffrt.models.layers import add_linear
from diffrt.models.ops import TORCH_OPS

ACTIVATIONS = ("quick_gelu", "gelu")

# transformers' CLIPTextConfig defaults, used for keys a config.json leaves out.
_TRANSFORMERS_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
    "projection_dim": 512,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # OpenAI CLIP: x * sigmoid(1.702 x); OpenCLIP: exact (erf) GELU
    layer_norm_eps: float = 1e-5
    # 2 is what every published SD text encoder config says; transformers then pools at argmax(input_ids), which is
    # the end token because <|endoftext|> has the highest id. Any other value pools at the first eos_token_id.
    eos_token_id: int = 2
    projection_dim: int | None = None  # set: a bias-free `text_projection` maps the pooled output (WithProjection)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: dict, with_projection: bool | None = None) -> "CLIPTextConfig":
        """From a transformers config.json of CLIPTextModel or CLIPTextModelWithProjection.

        The projection exists only for CLIPTextModelWithProjection (SD's CLIPTextModel configs also carry a
        `projection_dim`, unused); `with_projection` overrides what `architectures` says.
        """
        if "text_config" in config:
            raise ValueError("this is a full CLIPModel config; pass its 'text_config' (or a CLIPTextModel config)")
        if config.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"model_type {config['model_type']!r} is not a CLIP text model ('clip_text_model')")
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
        c = {**_TRANSFORMERS_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            max_position_embeddings=c["max_position_embeddings"],
            hidden_act=c["hidden_act"],
            layer_norm_eps=c["layer_norm_eps"],
            eos_token_id=c["eos_token_id"],
            projection_dim=c["projection_dim"] if with_projection else None,
        )


_CLIP_L = CLIPTextConfig()
PRESETS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14 as SD1.x and SDXL's text_encoder ship it (identical configs in both).
    "clip-l": _CLIP_L,
    # SD2.x text_encoder: OpenCLIP ViT-H/14 with its last of 24 layers removed (SD2 conditions on the penultimate).
    "openclip-h": replace(_CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, hidden_act="gelu"),
    # SDXL text_encoder_2: OpenCLIP ViT-bigG/14, all 32 layers, projected pooled output.
    "openclip-bigg": replace(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                             num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
    # Small members of each family for tests: same structure, odd widths, vocab large enough for the test BPE.
    "tiny-clip-l": replace(_CLIP_L, vocab_size=1024, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                           num_attention_heads=4),
    "tiny-openclip-h": replace(_CLIP_L, vocab_size=1024, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, hidden_act="gelu"),
    "tiny-openclip-bigg": replace(_CLIP_L, vocab_size=1024, hidden_size=40, intermediate_size=80, num_hidden_layers=4,
                                  num_attention_heads=5, hidden_act="gelu", projection_dim=24),
}  # fmt: skip


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, S, C] final_layer_norm(last layer's output)
    hidden_state: torch.Tensor  # [B, S, C] transformers' hidden_states[hidden_layer]: no final_layer_norm
    pooled: torch.Tensor  # [B, C] last_hidden_state at the end token; [B, projection_dim] when projected


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions are always 0..S-1, so slice the table instead of keeping transformers' position_ids buffer.
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    # ops.fuse_projections is read here, and the layer reads ops.fuse_text_residuals: at 77 tokens the text encoder
    # is launch-bound, and one GEMM for q, k and v is two launches fewer per layer; attention stays on torch's SDPA
    # (causal, short).
    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        c = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)
        self._qkv = JointLinear(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: [B, S, C] holding out_proj's bias already, added in its GEMM (in place; layers.add_linear)."""
        b, s, c = x.shape
        shape = (b, s, self.heads, c // self.heads)
        if self.ops.fuse_projections:
            q, k, v = self._qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # [B, S, C] -> [B, H, S, D] as strided views (of the joint GEMM's output too); SDPA takes any strides
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # default scale head_dim**-0.5, as CLIP's
        o = o.transpose(1, 2).reshape(b, s, c)
        return self.out_proj(o) if residual is None else add_linear(o, self.out_proj, residual)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: as CLIPAttention.forward's, for fc2."""
        h = self.act(self.fc1(x))
        return self.fc2(h) if residual is None else add_linear(h, self.fc2, residual)


class CLIPEncoderLayer(nn.Module):
    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ops.fuse_text_residuals:
            x = x + self.self_attn(self.layer_norm1(x))
            return x + self.mlp(self.layer_norm2(x))
        # As the UNet's transformer blocks with ops.fuse_residuals: each LayerNorm also writes x + the bias of the
        # projection that closes its sublayer, whose GEMM adds the sublayer's output to it in place. x itself is
        # never written, so a caller keeping it (the hidden state of a clip-skip layer) keeps its values.
        norm1, norm2 = self.layer_norm1, self.layer_norm2
        h, r = self.ops.layer_norm(x, norm1.weight, norm1.bias, norm1.eps, self.self_attn.out_proj.bias)
        x = self.self_attn(h, residual=r)
        h, r = self.ops.layer_norm(x, norm2.weight, norm2.bias, norm2.eps, self.mlp.fc2.bias)
        return self.mlp(h, residual=r)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when `config.projection_dim` is set."""

    # read by diffrt.models.text_conditioning (ops.concurrent_text_encoders), which runs SDXL's pair
    ops = TORCH_OPS  # per instance once diffrt.models.ops.set_ops has run

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False) if config.projection_dim else None
        )

    def forward(self, input_ids: torch.Tensor, hidden_layer: int = -2) -> CLIPTextOutput:
        """input_ids [B, S] (S <= max_position_embeddings) -> CLIPTextOutput.

        `hidden_layer` picks which intermediate state comes back as `hidden_state`, numbered as transformers'
        `hidden_states` tuple: 0 is the embeddings, i the output of layer i, -1 the last layer's output (before
        final_layer_norm), -2 the penultimate one that SD2 and SDXL condition on.
        """
        keep = self._layer_index(input_ids, hidden_layer)
        tm = self.text_model
        x = tm.embeddings(input_ids)
        hidden = x
        for i, layer in enumerate(tm.encoder.layers, start=1):
            x = layer(x)
            if i == keep:
                hidden = x
        last = tm.final_layer_norm(x)
        return CLIPTextOutput(last, hidden, self.pool(last, input_ids))

    def hidden_state(self, input_ids: torch.Tensor, hidden_layer: int = -2) -> torch.Tensor:
        """forward(input_ids, hidden_layer).hidden_state alone: the layers after that one are not run (SDXL's first
        encoder conditions on its penultimate layer and pools nothing; a clip_skip skips the layers it ignores)."""
        keep = self._layer_index(input_ids, hidden_layer)
        tm = self.text_model
        x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers[:keep]:
            x = layer(x)
        return x

    def _layer_index(self, input_ids: torch.Tensor, hidden_layer: int) -> int:
        """hidden_layer as an index into transformers' hidden_states (0: the embeddings), after checking both."""
        n = self.config.num_hidden_layers
        if not -(n + 1) <= hidden_layer <= n:
            raise ValueError(f"hidden_layer {hidden_layer} is out of range for {n} layers; use -{n + 1}..{n}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the {self.config.max_position_embeddings} positions of the "
                "text encoder; tokenize with truncation"
            )
        return hidden_layer % (n + 1)

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Features at each sequence's end token (transformers' pooler_output), projected when there is a projection.

        int32 ids because ONNX's ArgMax (opset 14) takes no int64, as transformers does.
        """
        ids = input_ids.to(torch.int32)
        if self.config.eos_token_id == 2:  # configs from before transformers PR #24773: the end token has the top id
            end = ids.argmax(dim=-1)
        else:  # the first end token (the pad token may be the end token too)
            end = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        index = end.to(torch.int64)[:, None, None].expand(-1, 1, last_hidden_state.shape[-1])
        pooled = last_hidden_state.gather(1, index).squeeze(1)
        return pooled if self.text_projection is None else self.text_projection(pooled)
