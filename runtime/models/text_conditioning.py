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

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from diffrt.models.clip import CLIPTextConfig, CLIPTextModel

_T = TypeVar("_T")


def deepest_clip_skip(config: CLIPTextConfig | None, config_2: CLIPTextConfig | None = None) -> int:
    """The largest clip_skip these encoders allow: SDXL counts from the penultimate layer of the shallower one."""
    layers = min(c.num_hidden_layers for c in (config, config_2) if c is not None)
    return layers - 1 if config_2 is not None else layers


def check_clip_skip(clip_skip: int | None, deepest: int) -> None:
    if clip_skip is not None and not (isinstance(clip_skip, int) and 0 <= clip_skip <= deepest):
        raise ValueError(f"clip_skip {clip_skip} is out of range; this text encoder allows 0..{deepest}")


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
        check_clip_skip(clip_skip, deepest_clip_skip(*(e and e.config for e in (text_encoder, text_encoder_2))))
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
            hidden = self.text_encoder.hidden_state(input_ids, hidden_layer=-(self.clip_skip + 1))
            return self.text_encoder.text_model.final_layer_norm(hidden), None

        layer = -((self.clip_skip or 0) + 2)
        if self.text_encoder is None:  # the refiner
            out_2 = self.text_encoder_2(input_ids_2, hidden_layer=layer)
            return out_2.hidden_state, out_2.pooled
        if self.text_encoder_2.ops.concurrent_text_encoders and input_ids.is_cuda:
            first, out_2 = _side_by_side(lambda: self.text_encoder.hidden_state(input_ids, hidden_layer=layer),
                                         lambda: self.text_encoder_2(input_ids_2, hidden_layer=layer))  # fmt: skip
        else:
            first = self.text_encoder.hidden_state(input_ids, hidden_layer=layer)
            out_2 = self.text_encoder_2(input_ids_2, hidden_layer=layer)
        return torch.cat([first, out_2.hidden_state], dim=-1), out_2.pooled


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_by_side(on_side: Callable[[], torch.Tensor], on_main: Callable[[], _T]) -> tuple[torch.Tensor, _T]:
    """(on_side(), on_main()) with on_side's work on a side stream, so the two overlap on the GPU. Both streams start
    after the work queued so far and the current stream waits for both; inside a CUDA graph capture the side stream
    joins the capture (a fork and a join in the graph)."""
    main = torch.cuda.current_stream()
    side = _side_streams.setdefault(main.device, torch.cuda.Stream(main.device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        side_out = on_side()
    main_out = on_main()
    main.wait_stream(side)
    side_out.record_stream(main)  # freed later on main: its memory must not go back to the side stream early
    return side_out, main_out
