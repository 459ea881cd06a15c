"""Every cross-attention layer's keys and values of the text, from one GEMM, once per generation.

A UNet's cross-attention layers all project the same text embedding (77 tokens a prompt) into keys and values, at
every step: 16 GEMMs of M = 77 a step in SD's UNet, 70 in SDXL's (~680 MB of weights, each GEMM too small to keep the
memory system busy: ~0.5 ms of SDXL's 512² step on the H200, benchmarks/NOTES_kernels.md run 17). The text does not
change between the steps of a generation, so the sampler loop needs them once: `CrossAttentionProjections(layers)(text)`
runs all their k and v projections as one GEMM (diffrt.models.joint_linear over every layer's weights, which become
views into one tensor, so state dicts and LoRA's in-place writes still see the layers), and the UNet's forward hands
each layer its slice through `context_carrying`.
"""

from torch import Tensor, nn

from diffrt.models.joint_linear import JointLinear

# The attribute under which the text tensor a UNet's blocks pass down carries {attention layer: (k, v)}; set on a view
# that the UNet's forward makes for itself, never on the caller's tensor, so it lives as long as that call.
CROSS_KV = "_diffrt_cross_attention_kv"


class CrossAttentionKV:
    """The keys and values of every cross-attention layer of one UNet for one text tensor (`text`, which must be the
    tensor the UNet is then called with)."""

    def __init__(self, text: Tensor, by_layer: dict[nn.Module, tuple[Tensor, Tensor]]) -> None:
        self.text, self.by_layer = text, by_layer

    def context_carrying(self, text: Tensor) -> Tensor:
        """A view of `text` carrying the per-layer keys and values, for the UNet's blocks to pass down."""
        if text is not self.text:
            raise ValueError(
                "cross_attention_kv was projected from another text tensor than encoder_hidden_states; project it "
                "from the tensor you pass (unet.cross_attention_kv(encoder_hidden_states))"
            )
        view = text.view_as(text)
        view.__dict__[CROSS_KV] = self.by_layer
        return view


def keys_values_of(layer: nn.Module, context: Tensor) -> tuple[Tensor, Tensor] | None:
    """The (k, v) of `layer` that `context` carries, or None (the layer projects the context itself)."""
    done = context.__dict__.get(CROSS_KV)
    return None if done is None else done.get(layer)


class CrossAttentionProjections:
    """`layers`' k and v projections of one text tensor as one GEMM (each layer: an Attention with to_k, to_v)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.joint = JointLinear(*(p for layer in layers for p in (layer.to_k, layer.to_v)))

    def __call__(self, text: Tensor) -> CrossAttentionKV:
        joined_before = self.joint.weight
        kv = self.joint(text)
        if self.joint.weight is not joined_before:
            # The layers' weights are now views of this joint tensor: drop each layer's own joint k/v tensor
            # (diffrt.models.layers.Attention._kv), which would otherwise keep a second copy of the weights alive.
            for layer in self.layers:
                layer._kv.release()
        return CrossAttentionKV(text, {layer: (kv[2 * i], kv[2 * i + 1]) for i, layer in enumerate(self.layers)})
