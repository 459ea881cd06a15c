"""Test-only: tiny presets exported once per test session, and ways to tamper with an export folder.

Exports are the slow part of the export tests (a tiny UNet traces in seconds on a CPU), so each (preset, dtype,
components) is exported once into a session folder and shared; tests that modify files copy a folder first.
"""

import json
import os
import shutil

import onnx
import torch

from diffrt.assembly import components_from_preset
from diffrt.export.exporter import export_components
from diffrt.export.manifest import MANIFEST, file_entry, source_record

_EXPORTS: dict[tuple, str] = {}


def exported(tmp_root, preset: str, dtype=torch.float32, names=None, seed: int = 0, **options) -> str:
    """The folder of `preset` exported in `dtype` (once per session for the same arguments)."""
    key = (preset, dtype, tuple(names or ()), seed, tuple(sorted(options.items())))
    if key not in _EXPORTS:
        folder = os.path.join(tmp_root, f"{preset}-{str(dtype)[6:]}-{len(_EXPORTS)}")
        export_components(components_from_preset(preset, seed), folder, dtype=dtype, names=names, progress=False,
                          source=source_record(preset, seed, is_preset=True), **options)  # fmt: skip
        _EXPORTS[key] = folder
    return _EXPORTS[key]


def copy_export(folder: str, to: str) -> str:
    shutil.copytree(folder, to)
    return to


def read_manifest_json(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def write_manifest_json(folder: str, manifest: dict) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)


def rewrite_model(folder: str, component: str, edit) -> None:
    """Apply edit(ModelProto) to a component's .onnx (external data left where it is) and re-record the model's
    hash and size in the manifest, as an attacker who controls the folder would: the refusal must then come from
    what the edit did, not from a stale hash."""
    manifest = read_manifest_json(folder)
    entry = manifest["components"][component]
    path = os.path.join(folder, entry["file"])
    model = onnx.load(path, load_external_data=False)
    edit(model)
    onnx.save_model(model, path)
    entry.update(file_entry(folder, entry["file"]))
    write_manifest_json(folder, manifest)


def set_external_location(model: onnx.ModelProto, location: str) -> None:
    for tensor in model.graph.initializer:
        for item in tensor.external_data:
            if item.key == "location":
                item.value = location
