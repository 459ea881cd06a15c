"""Token ids -> the UNet's text conditioning, as diffusers' `encode_prompt` computes it for the prompt.

- SD1.x / SD2.x (StableDiffusionPipeline): `last_hidden_state`; with `clip_skip` N, the output of the layer N
  before the last (transformers' hidden_states[-(N + 1)]) passed through `final_layer_norm`.
- SDXL (StableDiffusionXLPipeline): the penultimate layer's output of each encoder without final_layer_norm
  (hidden_states[-(clip_skip + 2)], clip_skip defaulting to 0), concatenated along features (768 + 1280 = 2048),
  and the pooled, projected output of the second encoder as `text_embeds`. The refiner has only the second encoder.

diffusers encodes a *negative* prompt without clip_skip (SD: last_hidden_state; SDXL: penultimate layer), and SDXL
with `force_zeros_for_empty_prompt` (the base model's default) uses zeros, not the encoded "", when no negative prompt
is given. To reproduce that, call these with clip_skip=None for negative prompts, or use zeros.
"""

import torch
from torch import nn

from diffrt.models.clip import CLIPTextModel
from diffrt.tokenizer import CLIPTokenizer


class PromptEncoder(nn.Module):
    """One graph from token ids to (prompt_embeds [B, 77, C], pooled [B, P] or None): what the UNet is given.

    SDXL-style conditioning is used when `text_encoder_2` is present (base: both encoders; refiner: only the second).
    """

    def __init__(
        self,
        text_encoder: CLIPTextModel | None,
        text_encoder_2: CLIPTextModel | None = None,
        clip_skip: int | None = None,
    ):
        super().__init__()
        if text_encoder is None and text_encoder_2 is None:
            raise ValueError("PromptEncoder needs at least one text encoder")
        if clip_skip is not None:
            layers = min(e.config.num_hidden_layers for e in (text_encoder, text_encoder_2) if e is not None)
            deepest = layers - 1 if text_encoder_2 is not None else layers  # SDXL counts from the penultimate layer
            if not 0 <= clip_skip <= deepest:
                raise ValueError(f"clip_skip {clip_skip} is out of range; this text encoder allows 0..{deepest}")
        if text_encoder_2 is not None and text_encoder_2.text_projection is None:
            raise ValueError("SDXL's text_encoder_2 must have a text_projection (CLIPTextModelWithProjection)")
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.clip_skip = clip_skip

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def forward(
        self, input_ids: torch.Tensor | None, input_ids_2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sdxl:
            if self.clip_skip is None:
                return self.text_encoder(input_ids).last_hidden_state, None
            out = self.text_encoder(input_ids, hidden_layer=-(self.clip_skip + 1))
            return self.text_encoder.text_model.final_layer_norm(out.hidden_state), None

        layer = -((self.clip_skip or 0) + 2)
        out_2 = self.text_encoder_2(input_ids_2, hidden_layer=layer)
        states = [out_2.hidden_state]
        if self.text_encoder is not None:
            states.insert(0, self.text_encoder(input_ids, hidden_layer=layer).hidden_state)
        return torch.cat(states, dim=-1), out_2.pooled


def encode_prompt(
    prompt: str | list[str],
    tokenizer: CLIPTokenizer | None,
    text_encoder: CLIPTextModel | None,
    tokenizer_2: CLIPTokenizer | None = None,
    text_encoder_2: CLIPTextModel | None = None,
    prompt_2: str | list[str] | None = None,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokenize and encode a prompt (SDXL: prompt_2 for the second encoder, defaulting to prompt)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts_2 = prompts if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
    if len(prompts_2) != len(prompts):
        raise ValueError(f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}; give as many")
    if (text_encoder is None) != (tokenizer is None) or (text_encoder_2 is None) != (tokenizer_2 is None):
        raise ValueError("give each text encoder its tokenizer (tokenizer with text_encoder, tokenizer_2 with _2)")
    ids = ids_2 = None
    if text_encoder is not None:
        ids = tokenizer(prompts).to(_device(text_encoder))
    if text_encoder_2 is not None:
        ids_2 = tokenizer_2(prompts_2).to(_device(text_encoder_2))
    with torch.inference_mode():
        return PromptEncoder(text_encoder, text_encoder_2, clip_skip)(ids, ids_2)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
