"""transformers CLIP text encoders saved with random weights, and ours read back from the saved folder."""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffrt.models.clip import CLIPTextConfig, CLIPTextModel


def save_reference(config: CLIPTextConfig, folder: Path, seed: int = 0):
    """A transformers text encoder of this config with random weights, saved to `folder`; returns the model."""
    from transformers import CLIPTextConfig as ReferenceConfig
    from transformers import CLIPTextModel as Reference
    from transformers import CLIPTextModelWithProjection as ReferenceWithProjection

    fields = asdict(config)
    projection_dim = fields.pop("projection_dim")
    cls = ReferenceWithProjection if projection_dim else Reference
    torch.manual_seed(seed)
    model = cls(ReferenceConfig(**fields, projection_dim=projection_dim or config.hidden_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return model


def load_ours(folder: Path) -> CLIPTextModel:
    config = CLIPTextConfig.from_transformers(json.loads((folder / "config.json").read_text()))
    state_dict = load_file(folder / "model.safetensors")
    # transformers 5 saves CLIPTextModel without its `text_model.` level (WithProjection and every earlier file keep
    # it); diffrt's loader adds it back, as here.
    state_dict = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
                  for k, v in state_dict.items()}  # fmt: skip
    model = CLIPTextModel(config).eval()
    model.load_state_dict(state_dict)  # strict: every key and shape must match
    return model
