"""Checkpoint file formats, told apart by their first bytes (never by the file name), and read into tensors."""

import os
import zipfile

import torch

from diffrt.loading.errors import PICKLE_RISK, CheckpointError
from diffrt.loading.safetensors_io import read_safetensors

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"  # torch.save since torch 1.6: a zip archive holding data.pkl + raw storages
PICKLE = "pickle"  # legacy torch.save: a bare pickle stream


def detect_format(path: str | os.PathLike) -> str:
    """Return SAFETENSORS, TORCH_ZIP or PICKLE from the file's content, or raise CheckpointError saying what it is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: a damaged zip archive ({e}), not a readable checkpoint") from e
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return TORCH_ZIP
        raise CheckpointError(f"{path}: a zip archive without data.pkl ({names[:3]}...), not a torch checkpoint")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return PICKLE
    # safetensors: a u64 header length, then a JSON object. The brace is enough to recognize it; a wrong length is
    # the reader's to report, with the file size in the message.
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: fetch it with `git lfs pull`")
    if head.startswith(b"GGUF"):
        raise CheckpointError(f"{path} is a GGUF file; diffrt reads safetensors (and, with opt-in, torch pickles)")
    raise CheckpointError(
        f"{path}: unknown checkpoint format (first bytes {head[:16]!r}). Expected safetensors (8-byte length + "
        "JSON header), or a torch.save checkpoint (zip or pickle; needs allow_pickle=True)"
    )


def _tensors_of(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a torch.save'd object: the object itself, or its "state_dict" (LDM .ckpt files)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {list(obj)[:8]})")
    return tensors


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of one checkpoint file, on CPU. Pickles are refused unless allow_pickle (then weights_only)."""
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == SAFETENSORS:
        return read_safetensors(path)
    if not allow_pickle:
        raise CheckpointError(f"{path}: refusing to load a pickle checkpoint ({fmt}). {PICKLE_RISK}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == TORCH_ZIP)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) failed: {e}. A file that needs full unpickling is not "
            "supported; convert it to safetensors in a trusted environment"
        ) from e
    return _tensors_of(obj, path)
