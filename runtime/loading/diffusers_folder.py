"""diffusers / transformers folders: a pipeline's model_index.json, a component's config.json and its weight files.

Weight file names (diffusers `_add_variant`, transformers alike): `diffusion_pytorch_model[.VARIANT].safetensors`,
`model[.VARIANT].safetensors`, sharded as `STEM.safetensors.index[.VARIANT].json` whose `weight_map` names the
shard of every key; `.bin` pickles under the same names are read only with allow_pickle.
"""

import json
import os
import re
from dataclasses import dataclass

import torch

from diffrt.loading.errors import PICKLE_RISK, CheckpointError
from diffrt.loading.formats import read_checkpoint

STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_STEM = "(?P<stem>" + "|".join(STEMS) + ")"
_SINGLE = re.compile(_STEM + r"(?:\.(?P<variant>[^.]+))?\.(?P<ext>safetensors|bin)$")
_INDEX = re.compile(_STEM + r"\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def is_component_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def pipeline_components(folder: str) -> dict[str, tuple[str, str]]:
    """{component: (library, class name)} from model_index.json, for the entries that name a class."""
    index = read_json(os.path.join(folder, "model_index.json"))
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[1] is None:
            continue
        out[name] = (str(value[0]), str(value[1]))
    return out


def model_class_name(config: dict, path: str, default: str | None = None) -> str:
    """The class a component config describes: diffusers' `_class_name`, transformers' `architectures[0]`, or the
    class model_index.json names for it (`default`)."""
    if isinstance(config.get("_class_name"), str):
        return config["_class_name"]
    arch = config.get("architectures")
    if isinstance(arch, list) and arch and isinstance(arch[0], str):
        return arch[0]
    if default:
        return default
    raise CheckpointError(f"{path}: config.json names no model class (_class_name or architectures)")


@dataclass(frozen=True)
class WeightFiles:
    kind: str  # "single" or "index"
    file: str  # the weight file, or the index JSON
    variant: str | None
    ext: str  # "safetensors" or "bin"


def _weight_candidates(folder: str) -> list[WeightFiles]:
    found = []
    for name in sorted(os.listdir(folder)):
        for kind, pattern in (("single", _SINGLE), ("index", _INDEX)):
            m = pattern.match(name)
            if m and not (m["variant"] and _SHARD_SUFFIX.search(m["variant"])):
                found.append(WeightFiles(kind, os.path.join(folder, name), m["variant"], m["ext"]))
    return found


def find_weights(folder: str, variant: str | None = None, allow_pickle: bool = False) -> WeightFiles:
    """Pick the weight file (or shard index) of a component folder for `variant`, safetensors before pickles."""
    found = _weight_candidates(folder)
    match = [w for w in found if w.variant == variant]
    # safetensors first; a single file before an index (a leftover index beside a merged file is ignored)
    match.sort(key=lambda w: (w.ext != "safetensors", w.kind != "single"))
    variants = sorted({w.variant for w in found if w.variant})
    if not match:
        if not found:
            raise CheckpointError(
                f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors or model.safetensors, "
                "optionally with a variant like .fp16, or a sharded *.safetensors.index.json)"
            )
        if variant is None:
            raise CheckpointError(
                f"{folder}: no default weight file, but variant(s) {variants} exist; "
                f"did you mean the {variants[0]} variant? Pass variant={variants[0]!r} (CLI: --variant {variants[0]})"
            )
        have = [repr(v) for v in variants] + (["None (the default)"] if any(w.variant is None for w in found) else [])
        raise CheckpointError(f"{folder}: no weights for variant={variant!r}; available: {', '.join(have)}")
    best = match[0]
    if best.ext == "bin" and not allow_pickle:
        raise CheckpointError(f"{best.file}: only pickle weights (.bin) here; refusing to load them. {PICKLE_RISK}")
    return best


def _check_shard_name(name: object, index_file: str) -> str:
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise CheckpointError(f"{index_file}: shard name {name!r} must be a plain file name in the same folder")
    return name


def read_sharded(index_file: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read every shard an index names, checking that each key sits in exactly the shard the index says."""
    index = read_json(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: missing or empty 'weight_map'")
    folder = os.path.dirname(index_file)
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(_check_shard_name(shard, index_file), []).append(key)
    state_dict: dict[str, torch.Tensor] = {}
    for shard, keys in by_shard.items():
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_file}: shard {shard!r} (holding e.g. {keys[0]!r}) does not exist")
        tensors = read_checkpoint(path, allow_pickle=allow_pickle)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"{path}: the index maps {missing[:5]} to this shard but it lacks them")
        stray = [k for k in tensors if weight_map.get(k) != shard]
        if stray:
            k = stray[0]
            where = f"the index maps it to {weight_map[k]!r}" if k in weight_map else "the index does not list it"
            raise CheckpointError(f"{path}: holds key {k!r} but {where} ({len(stray)} such key(s))")
        state_dict.update(tensors)
    return state_dict


def read_weights(weights: WeightFiles, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    if weights.kind == "index":
        return read_sharded(weights.file, allow_pickle=allow_pickle)
    return read_checkpoint(weights.file, allow_pickle=allow_pickle)
