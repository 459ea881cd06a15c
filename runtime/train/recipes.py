"""What `diffrt train` builds and how long it trains: architectures (as diffusers / transformers config dicts, so a
component folder is written from them verbatim) and each stage's default settings.

"default" is the model meant to ship (64x64 images, 8x8x4 latents, under 30 MB in fp16); "tiny" keeps every
structural feature at a size whose training steps take milliseconds on a CPU, for the tests.
GroupNorm groups hold at least 4 channels: with one channel per group, a flat-colored image loses its color level
at every norm (SD's models have 4 to 40 channels per group).
"""

import copy
import json
import os
from dataclasses import dataclass, field

# Stable Diffusion's training noise schedule (all SD 1.x/2.x checkpoints' scheduler_config.json).
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
LCM_TIME_COND_DIM = 256  # LCM-SD's w-embedding width (diffusers' train_lcm_distill_sd_wds.py default)


@dataclass(frozen=True)
class Architecture:
    image_size: int
    vae: dict  # diffusers AutoencoderKL config (scaling_factor is measured after the VAE is trained)
    text: dict  # transformers CLIPTextConfig (vocab_size comes from the trained tokenizer)
    unet: dict  # diffusers UNet2DConditionModel config (cross_attention_dim = text hidden_size)
    tokenizer_vocab: int = 1024  # upper bound on the BPE vocabulary, CLIP's 512 byte symbols included

    def as_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


def _vae(channels: tuple[int, ...], layers: int, groups: int) -> dict:
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        "force_upcast": True,
    }


def _text(hidden: int, layers: int, heads: int) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": 0,  # SD1's text_encoder/config.json values; pooling takes argmax(ids), the end token
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _unet(image_size: int, channels: tuple[int, ...], heads: tuple[int, ...], layers: int, text: int, groups: int):
    n = len(channels)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": image_size // 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "attention_head_dim": list(heads),  # diffusers' name for the head COUNT
        "cross_attention_dim": text,
        "norm_num_groups": groups,
        "use_linear_projection": False,
    }


ARCHITECTURES: dict[str, Architecture] = {
    "default": Architecture(
        image_size=64,
        vae=_vae((32, 64, 96, 96), layers=1, groups=8),  # 2.4 M parameters
        text=_text(hidden=128, layers=4, heads=4),  # 0.9 M
        unet=_unet(64, (64, 128, 128), heads=(2, 4, 4), layers=2, text=128, groups=16),  # 8.8 M
    ),
    "tiny": Architecture(
        image_size=32,
        vae=_vae((16, 32, 32, 32), layers=1, groups=4),
        text=_text(hidden=32, layers=2, heads=2),
        unet=_unet(32, (32, 64), heads=(2, 4), layers=1, text=32, groups=8),
        tokenizer_vocab=640,
    ),
}


@dataclass
class StageSettings:
    """One stage's settings; saved in its state.json, and a resume must use the same ones."""

    steps: int
    batch: int
    lr: float
    warmup: int
    seed: int = 0
    precision: str = "fp32"  # "bf16": autocast on CUDA (no effect on the result's format, which is exported fp16)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}


# The shipped model's recipe at 64x64, as it ran on an H100 (README "How the shipped model was trained"): each stage
# was time-boxed on the device and ended at the step it had reached, which became its step count here.
STAGES: dict[str, StageSettings] = {
    "vae": StageSettings(steps=6_960, batch=128, lr=4e-4, warmup=500, extra={"kl_weight": 1e-6, "l2_weight": 1.0}),
    "text": StageSettings(steps=2_000, batch=256, lr=5e-4, warmup=100),
    "unet": StageSettings(
        steps=3_206,
        batch=1024,
        lr=3e-4,
        warmup=200,
        extra={"text_lr": 2e-5, "caption_dropout": 0.1, "ema_decay": 0.9995},
    ),
    "lcm": StageSettings(
        steps=1_039,
        batch=512,
        lr=5e-5,
        warmup=200,
        extra={"w_min": 2.0, "w_max": 8.0, "ddim_steps": 50, "ema_decay": 0.95, "huber_c": 0.001},
    ),
    # The embedded model's ControlNet (diffrt.train.controlnet), sized for a few minutes of one H200: the UNet stage
    # ran 0.16 s/step at batch 1024 on an H100; this step is about a UNet step at half that batch (frozen UNet forward
    # and backward to the residuals, plus the ControlNet's), so 3000 steps x 512 is about 5 minutes (not measured).
    "controlnet": StageSettings(steps=3_000, batch=512, lr=1e-4, warmup=100, extra={"w_min": 2.0, "w_max": 8.0}),
}


def stage_settings(stage: str, **overrides) -> StageSettings:
    """The stage's defaults with the given fields replaced (None means keep); unknown keys go to `extra`."""
    s = copy.deepcopy(STAGES[stage])
    for key, value in overrides.items():
        if value is None:
            continue
        if hasattr(s, key) and key != "extra":
            setattr(s, key, value)
        elif key in s.extra:
            s.extra[key] = value
        else:
            raise ValueError(f"stage {stage!r} has no setting {key!r}; it has {sorted([*s.__dict__, *s.extra])}")
    return s


RUN_FILE = "run.json"


def init_run(run: str, preset: str | None) -> Architecture:
    """Create the run folder with the preset's architecture (default "default"), or read the one it has; a preset
    that differs from the run's is an error."""
    path = os.path.join(run, RUN_FILE)
    if os.path.isfile(path):
        arch = read_run(run)
        if preset is not None and ARCHITECTURES.get(preset) != arch:
            raise ValueError(f"run {run} was created with another architecture than preset {preset!r}; omit --preset")
        return arch
    preset = preset or "default"
    if preset not in ARCHITECTURES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(ARCHITECTURES)}")
    os.makedirs(run, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"preset": preset, "architecture": ARCHITECTURES[preset].as_dict()}, f, indent=2)
    return ARCHITECTURES[preset]


def read_run(run: str) -> Architecture:
    path = os.path.join(run, RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{run} is not a training run (no {RUN_FILE}); start one with `diffrt train vae {run}`")
    with open(path) as f:
        return Architecture(**json.load(f)["architecture"])
