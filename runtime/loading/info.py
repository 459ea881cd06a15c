"""`diffrt info PATH`: what a checkpoint is (family, components, dtypes, parameter counts) and how that was decided.

Reads headers and tensor metadata only (safetensors data stays unread in the memory map) unless --check-finite asks
for a scan of every weight.
"""

import argparse
import json
import os
from collections import Counter

from diffrt.loading.api import read_checkpoint_components
from diffrt.loading.finite import describe_nonfinite, nonfinite_keys
from diffrt.loading.single_file import FAMILY_NAMES

# The config fields that say what a component is, per class.
SUMMARY_FIELDS = {
    "UNet2DConditionModel": ("in_channels", "block_out_channels", "layers_per_block", "transformer_layers_per_block",
                             "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                             "addition_embed_type"),
    "AutoencoderKL": ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"),
    "AutoencoderTiny": ("encoder_block_out_channels", "decoder_block_out_channels", "latent_channels"),
    "CLIPTextModel": ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act"),
    "CLIPTextModelWithProjection": ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                                    "projection_dim"),
}  # fmt: skip


def describe(path: str, *, variant: str | None = None, allow_pickle: bool = False, check_finite: bool = False) -> dict:
    """A JSON-able summary of the checkpoint at `path`."""
    ckpt = read_checkpoint_components(path, variant=variant, allow_pickle=allow_pickle)
    components = {}
    for name, comp in ckpt.components.items():
        floats = [t for t in comp.state_dict.values() if t.is_floating_point()]
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in comp.state_dict.values())
        entry = {
            "class": comp.class_name,
            "parameters": sum(t.numel() for t in floats),
            "tensors": len(comp.state_dict),
            "dtypes": dict(dtypes.most_common()),
            "config": {
                k: comp.config[k] for k in SUMMARY_FIELDS.get(comp.class_name, ()) if comp.config.get(k) is not None
            },
            "source": comp.source,
        }
        if check_finite:
            entry["nonfinite"] = {k: {"nan": n, "inf": i} for k, (n, i) in nonfinite_keys(comp.state_dict).items()}
        components[name] = entry
    return {
        "path": path,
        "kind": ckpt.kind,
        "family": ckpt.family,
        "detected_from": ckpt.reasons,
        "prediction_type": (ckpt.scheduler_config or {}).get("prediction_type"),
        "components": components,
        "total_parameters": sum(c["parameters"] for c in components.values()),
        "other_folders": ckpt.folders,
        "not_loaded": ckpt.skipped,
        "ignored_keys": ckpt.ignored_keys,
    }


def format_summary(s: dict) -> str:
    family = FAMILY_NAMES.get(s["family"], "family unknown") if s["family"] else "family unknown"
    lines = [f"{s['path']}: {s['kind']}, {family}"]
    if s["detected_from"]:
        lines.append("detected from:")
        lines += [f"  - {r}" for r in s["detected_from"]]
    lines.append("components:")
    width = max((len(n) for n in s["components"]), default=0)
    for name, c in s["components"].items():
        dtypes = ", ".join(d if len(c["dtypes"]) == 1 else f"{d} ({n} tensors)" for d, n in c["dtypes"].items())
        lines.append(f"  {name:<{width}}  {c['class']:<28} {c['parameters']:>15,} params  {dtypes}")
        if c["config"]:
            lines.append(f"  {'':<{width}}  " + ", ".join(f"{k}={v}" for k, v in c["config"].items()))
        if "nonfinite" in c:
            bad = {k: (v["nan"], v["inf"]) for k, v in c["nonfinite"].items()}
            lines.append(f"  {'':<{width}}  NaN/Inf: " + (describe_nonfinite(bad) if bad else "none"))
    lines.append(f"total: {s['total_parameters']:,} parameters")
    for name, folder in s["other_folders"].items():
        lines.append(f"{name}: {folder}")
    for name, cls in s["not_loaded"].items():
        lines.append(f"{name}: {cls} (not loaded by diffrt)")
    if s["ignored_keys"]:
        shown = ", ".join(s["ignored_keys"][:5]) + (", ..." if len(s["ignored_keys"]) > 5 else "")
        lines.append(f"ignored: {len(s['ignored_keys'])} training-only key(s) ({shown})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summary = describe(
        os.fspath(args.path), variant=args.variant, allow_pickle=args.allow_pickle, check_finite=args.check_finite
    )
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    bad = any(c.get("nonfinite") for c in summary["components"].values())
    return 1 if bad else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a checkpoint: family, components, dtypes, parameter counts",
        description="Describe a diffusers folder (pipeline or component) or a single-file LDM/SGM checkpoint.",
    )
    p.add_argument("path", help="a diffusers folder, or a .safetensors single file")
    p.add_argument("--variant", default=None, help="weight variant of a diffusers folder, e.g. fp16")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .ckpt/.pt/.bin pickles (with torch.load(weights_only=True)); only for files you trust",
    )
    p.add_argument("--check-finite", action="store_true", help="scan every weight for NaN/Inf (reads the whole file)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
