"""Named pipeline presets: the real architectures (and small test versions) with random weights.

No pretrained weights can be downloaded in this workplace, so speed is measured on these: the real architectures with
random weights (speed does not depend on the values). Their pictures are noise; `is_random` says so wherever a preset
is used. Each scheduler config is the one the family's public checkpoints ship (diffusers' scheduler_config.json).
"""

from dataclasses import dataclass

from diffrt.clip_bpe import BOS, EOS, base_vocabulary
from diffrt.tokenizer import CLIPTokenizer

# Stable Diffusion's training schedule (all SD 1.x/2.x/XL checkpoints): scaled-linear betas 0.00085..0.012.
_SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


@dataclass(frozen=True)
class PipelinePreset:
    """Component presets by name (see each model module's PRESETS) and the family's scheduler config."""

    family: str  # "sd1", "sd2", "sdxl"
    unet: str
    vae: str
    text_encoders: tuple[str, ...]  # SDXL: (CLIP-L, OpenCLIP bigG)
    scheduler: dict


PRESETS: dict[str, PipelinePreset] = {
    "sd15": PipelinePreset("sd1", "sd15", "sd", ("clip-l",), _SD_SCHEDULE),
    # SD 2.1 768-v predicts v; SD-Turbo shares this UNet with epsilon prediction.
    "sd21": PipelinePreset("sd2", "sd21", "sd", ("openclip-h",), {**_SD_SCHEDULE, "prediction_type": "v_prediction"}),
    "sdxl": PipelinePreset(
        "sdxl", "sdxl", "sdxl", ("clip-l", "openclip-bigg"), {**_SD_SCHEDULE, "timestep_spacing": "leading"}
    ),
    "tiny-sd15": PipelinePreset("sd1", "tiny-sd15", "tiny", ("tiny-clip-l",), _SD_SCHEDULE),
    "tiny-sd21": PipelinePreset(
        "sd2", "tiny-sd21", "tiny", ("tiny-openclip-h",), {**_SD_SCHEDULE, "prediction_type": "v_prediction"}
    ),
    "tiny-sdxl": PipelinePreset(
        "sdxl",
        "tiny-sdxl",
        "tiny",
        ("tiny-clip-l", "tiny-openclip-bigg"),
        {**_SD_SCHEDULE, "timestep_spacing": "leading"},
    ),
}


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with CLIP's base vocabulary (bytes, bytes + `</w>`) and no merges: one token per byte.

    The random-weight presets have no trained vocabulary; this one encodes any prompt losslessly in 514 ids, which
    fits every preset's embedding table.
    """
    tokens = [*base_vocabulary(), BOS, EOS]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, [])
