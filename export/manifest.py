"""An export folder's `manifest.json`: what was exported from what, with which tools, checked at which shapes.

It is the folder's commit point: written last and atomically, after every component passed its check, so a folder
with a manifest is complete. Loading re-checks every file it lists (diffrt.export.safety) before parsing any.

    {"format": "diffrt-onnx", "version": 1, "opset": 18, "dtype": "float16",
     "versions": {"diffrt", "torch", "onnx", "onnxruntime", "python"},
     "source": {"preset", "seed"} | {"path", "files": {name: sha256}},
     "model": {"scheduler_config", "force_zeros_for_empty_prompt", "is_random", "parameters"},
     "tokenizers": {"tokenizer": [{"file", "bytes", "sha256"}, ...], ...},
     "components": {"unet": {"file", "bytes", "sha256", "external_data": [...], "class", "config", "dtype",
                             "weights_sha256", "graph": {"inputs", "outputs"}, "checked": [...]}, ...}}
"""

import hashlib
import json
import os
import platform
import sys
from dataclasses import asdict

import torch
from torch import nn

from diffrt.export.files import sha256_file, write_atomically
from diffrt.loading.errors import CheckpointError

FORMAT, VERSION = "diffrt-onnx", 1
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt")


def versions() -> dict[str, str | None]:
    import onnx

    # The parent package is always imported before its modules; reading it from sys.modules rather than importing
    # it keeps diffrt.export out of an import cycle through diffrt's lazy front (diffrt/__init__.py).
    version = sys.modules["diffrt"].__version__
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    return {"diffrt": version, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort,
            "python": platform.python_version()}  # fmt: skip


def file_entry(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    return {"file": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def source_record(path_or_preset: str | os.PathLike, seed: int, is_preset: bool) -> dict:
    """Where the weights came from: a preset and its seed, or the checkpoint's files and their sha256."""
    if is_preset:
        return {"preset": str(path_or_preset), "seed": seed}
    path = os.path.abspath(os.fspath(path_or_preset))
    if os.path.isfile(path):
        return {"path": path, "files": {os.path.basename(path): sha256_file(path)}}
    files = {}
    for root, _, names in os.walk(path):
        for name in sorted(names):
            if name.endswith(WEIGHT_SUFFIXES):
                full = os.path.join(root, name)
                files[os.path.relpath(full, path)] = sha256_file(full)
    return {"path": path, "files": dict(sorted(files.items()))}


def weights_sha256(module: nn.Module) -> str:
    """A hash of a module's state (names, dtypes, shapes and bytes): equal weights, equal hash, whatever the file."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_record(config) -> dict:
    return json.loads(json.dumps(asdict(config)))


def write_manifest(folder: str, manifest: dict) -> None:
    write_atomically(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1).encode())


def read_manifest(folder: str) -> dict:
    """The manifest of an export folder, its format checked; its files are checked by diffrt.export.safety."""
    from diffrt.export.safety import contained_path

    path = contained_path(os.fspath(folder), MANIFEST, "manifest")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable manifest ({e}); export again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a diffrt ONNX export manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: manifest version {manifest.get('version')} is not {VERSION}, which this diffrt reads; "
            "export again with this version"
        )
    return manifest


def is_export_folder(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))
