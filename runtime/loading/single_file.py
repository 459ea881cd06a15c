"""Single-file checkpoints with the original LDM (SD1/SD2) or SGM (SDXL) key names, split into diffusers components.

The family is read from the keys and shapes, never the file name, and every clue is kept as a sentence for
`diffrt info`: the text encoder layout (`cond_stage_model.transformer` = OpenAI CLIP -> SD1, `cond_stage_model.model`
= OpenCLIP -> SD2, `conditioner.embedders` -> SDXL), SDXL's `label_emb`, proj_in's rank (SD2/SDXL linear, SD1 1x1
conv) and the UNet's cross-attention width (768 SD1, 1024 SD2, 2048 SDXL at full size).
"""

from dataclasses import dataclass, field

import torch

from diffrt.loading.errors import CheckpointError
from diffrt.loading.ldm_clip import convert_hf_clip, convert_open_clip
from diffrt.loading.ldm_unet import convert_unet
from diffrt.loading.ldm_vae import convert_vae

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_CLIP, SD2_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_CLIP_L, SDXL_CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
PREFIXES = (UNET, VAE, SD1_CLIP, SD2_CLIP, SDXL_CLIP_L, SDXL_CLIP_G)
# Training leftovers that no inference module uses: the diffusion schedule's buffers, EMA copies, the VAE's training
# loss (LPIPS + discriminator), SGM's denoiser tables, and marker tensors some fine-tunes add (handled below).
_IGNORED_NAMES = (
    "alphas_cumprod alphas_cumprod_prev betas log_one_minus_alphas_cumprod logvar lvlb_weights "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 posterior_variance "
    "sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod "
    "v_pred ztsnr"
)
IGNORED_KEYS = set(_IGNORED_NAMES.split())
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "denoiser.", "cond_stage_model.model.visual.")
CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
SCHEDULER = {  # the published schedulers of the families; prediction_type per family below
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass
class Component:
    """One model's weights under diffusers/transformers names, and the config that builds it."""

    name: str  # "unet", "vae", "text_encoder", "text_encoder_2"
    class_name: str  # "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", ...
    config: dict
    state_dict: dict[str, torch.Tensor]
    source: str  # the file (and prefix) it came from, for messages


@dataclass
class SingleFile:
    family: str | None  # "sd1" / "sd2" / "sdxl", None for a lone VAE
    components: dict[str, Component]
    reasons: list[str]  # how the family and each config were determined
    scheduler_config: dict | None
    ignored: list[str] = field(default_factory=list)


def _take(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def is_single_file(keys) -> bool:
    """Does this key set look like an LDM/SGM checkpoint (or a bare LDM VAE)?"""
    keys = list(keys)
    return any(k.startswith(PREFIXES) for k in keys) or "encoder.down.0.block.0.conv1.weight" in keys


def _family_from_text(sd: dict, path: str) -> tuple[str | None, str | None]:
    found = [p for p in (SD1_CLIP, SD2_CLIP, SDXL_CLIP_L, SDXL_CLIP_G) if any(k.startswith(p) for k in sd)]
    if not found:
        return None, None
    ldm = [p for p in found if p in (SD1_CLIP, SD2_CLIP)]
    if len(ldm) > 1 or (ldm and len(found) > len(ldm)):
        raise CheckpointError(f"{path}: text encoders of different families in one file: {found}")
    if not ldm:
        if SDXL_CLIP_L not in found:
            raise CheckpointError(
                f"{path}: {SDXL_CLIP_G}* without {SDXL_CLIP_L}* (an SDXL refiner?); only SDXL base is supported"
            )
        return "sdxl", f"text encoders under conditioner.embedders.* ({', '.join(found)}): SGM layout of SDXL"
    if found == [SD2_CLIP]:
        return "sd2", f"text encoder {SD2_CLIP}* is OpenCLIP (ViT-H in SD2)"
    return "sd1", f"text encoder {SD1_CLIP}* is OpenAI CLIP through transformers (ViT-L in SD1)"


def _unet_clues(unet_sd: dict, path: str) -> tuple[str, list[str], int]:
    """(family, clue sentences, cross-attention width) from the raw LDM UNet keys."""
    to_k = next((v for k, v in sorted(unet_sd.items()) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in sorted(unet_sd.items()) if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise CheckpointError(f"{path}: the UNet has no cross-attention (attn2 / proj_in keys); not SD-family")
    ctx, linear, label = to_k.shape[1], proj_in.ndim == 2, "label_emb.0.0.weight" in unet_sd
    known = f" ({FAMILY_NAMES[CONTEXT_DIM[ctx]]} at full size)" if ctx in CONTEXT_DIM else ""
    clues = [f"UNet cross-attention width {ctx}{known}", f"proj_in is {'linear' if linear else 'a 1x1 conv'}"]
    clues.append("label_emb present (SDXL's added text/time conditioning)" if label else "no label_emb")
    return ("sdxl" if label else "sd2" if linear else "sd1"), clues, ctx


def split_single_file(sd: dict[str, torch.Tensor], path: str) -> SingleFile:
    """Convert an LDM/SGM state dict into diffusers components with inferred configs."""
    reasons: list[str] = []
    ignored = sorted(k for k in sd if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES))
    unknown = sorted(set(sd) - set(ignored) - {k for k in sd if k.startswith(PREFIXES)})
    components: dict[str, Component] = {}

    def add(name: str, config: dict, state: dict) -> None:
        class_name = config.get("_class_name") or config["architectures"][0]
        components[name] = Component(name, class_name, config, state, f"{path} [{name}]")

    if not any(k.startswith(PREFIXES) for k in sd):  # a bare LDM VAE (e.g. vae-ft-mse-840000-ema-pruned)
        skip = set(ignored)
        state, config = convert_vae({k: v for k, v in sd.items() if k not in skip}, path)
        reasons.append(
            "keys encoder.down.*/decoder.up.* without prefix: a standalone LDM VAE; scaling_factor "
            f"{config['scaling_factor']} assumed (SD1/SD2; SDXL's VAE uses 0.13025)"
        )
        add("vae", config, state)
        return SingleFile(None, components, reasons, None, ignored)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} key(s) outside the known LDM/SGM components: {unknown[:8]}; "
            f"known prefixes: {', '.join(PREFIXES)}"
        )

    family, why = _family_from_text(sd, path)
    if why:
        reasons.append(why)
    te_width = None
    pooled_dim = None
    if family == "sd1":
        state, config = convert_hf_clip(_take(sd, SD1_CLIP), path + f" [{SD1_CLIP}*]")
        add("text_encoder", config, state)
        te_width = config["hidden_size"]
    elif family == "sd2":
        state, config = convert_open_clip(_take(sd, SD2_CLIP), path + f" [{SD2_CLIP}*]", penultimate=True)
        add("text_encoder", config, state)
        reasons.append(
            f"SD2 uses OpenCLIP's penultimate layer: kept {config['num_hidden_layers']} of "
            f"{config['num_hidden_layers'] + 1} resblocks, dropped text_projection"
        )
        te_width = config["hidden_size"]
    elif family == "sdxl":
        s1, c1 = convert_hf_clip(_take(sd, SDXL_CLIP_L), path + f" [{SDXL_CLIP_L}*]")
        add("text_encoder", c1, s1)
        te_width = c1["hidden_size"]
        if any(k.startswith(SDXL_CLIP_G) for k in sd):
            s2, c2 = convert_open_clip(_take(sd, SDXL_CLIP_G), path + f" [{SDXL_CLIP_G}*]", penultimate=False)
            if "text_projection.weight" not in s2:
                raise CheckpointError(f"{path}: {SDXL_CLIP_G}text_projection is missing (SDXL pools through it)")
            add("text_encoder_2", c2, s2)
            te_width += c2["hidden_size"]
            pooled_dim = c2["projection_dim"]

    if any(k.startswith(UNET) for k in sd):
        unet_sd = _take(sd, UNET)
        unet_family, clues, ctx = _unet_clues(unet_sd, path)
        reasons.append("; ".join(clues))
        if family is not None and family != unet_family:
            raise CheckpointError(
                f"{path}: the text encoders say {FAMILY_NAMES[family]} but the UNet does not ({'; '.join(clues)})"
            )
        if te_width is not None and te_width != ctx:
            raise CheckpointError(
                f"{path}: text encoder width {te_width} != UNet cross-attention width {ctx}; mixed components?"
            )
        family = unet_family
        state, config, _ = convert_unet(unet_sd, path + f" [{UNET}*]", family, pooled_dim)
        if config.get("addition_embed_type"):
            reasons.append(f"SDXL addition_time_embed_dim {config['addition_time_embed_dim']} from label_emb's width")
        heads = config["attention_head_dim"]
        reasons.append(
            f"attention heads by {FAMILY_NAMES[family]} convention: "
            + ("8 per block" if family == "sd1" else f"64 channels each, {heads}")
        )
        add("unet", config, state)

    if any(k.startswith(VAE) for k in sd):
        vae_sd = {k: v for k, v in _take(sd, VAE).items() if not k.startswith("loss.")}
        state, config = convert_vae(vae_sd, path + f" [{VAE}*]", family)
        add("vae", config, state)
        reasons.append(f"VAE scaling_factor {config['scaling_factor']} by {FAMILY_NAMES.get(family, 'SD1')} convention")

    scheduler = None
    if family is not None:
        # SD2's single files are mostly the 768-px v-prediction models (diffusers assumes the same); SGM files mark
        # v-prediction and zero-terminal-SNR fine-tunes with empty `v_pred` / `ztsnr` tensors.
        v_pred = family == "sd2" or "v_pred" in sd
        scheduler = dict(SCHEDULER, prediction_type="v_prediction" if v_pred else "epsilon")
        if "ztsnr" in sd:
            scheduler.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        why = "family default"
        if "v_pred" in sd:
            why = "`v_pred` key"
        elif family == "sd2":
            why = "SD2 single files default to v-prediction; the weights cannot tell"
        reasons.append(f"prediction_type {scheduler['prediction_type']} ({why})")
    return SingleFile(family, components, reasons, scheduler, ignored)
