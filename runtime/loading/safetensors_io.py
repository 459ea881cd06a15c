"""safetensors files read through the `safetensors` library, with errors that name the file and the tensor.

The library validates the whole header before it maps a byte (header size, JSON, dtypes, shapes, offsets inside the
data buffer, tensors laid end to end without overlap, gap or trailing bytes) and returns tensors that view a
private memory map of the file (nothing is read until used; writes never reach the file). This module only words
its errors for people (naming the file, and the tensor where it can be told) and adds the one check the library
does not make: a header that names a tensor twice is refused (two readers could pick different tensors).
"""

import contextlib
import json
import os
import re
import struct
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open

from diffrt.loading.errors import CheckpointError

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class SafetensorsHeader:
    path: str
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Validate a safetensors file's header (its data stays unread) and return its metadata."""
    path = os.fspath(path)
    with _opened(path) as f:
        return SafetensorsHeader(path, dict(f.metadata() or {}))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Validate, then return CPU tensors that view a copy-on-write map of the file (no copy until written)."""
    path = os.fspath(path)
    with _opened(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@contextlib.contextmanager
def _opened(path: str):
    """safe_open(path), its errors turned into CheckpointErrors that say what is wrong."""
    try:
        handle = safe_open(path, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: {_explain(str(e), path)}") from e
    _refuse_duplicate_keys(path)
    with handle as f:
        yield f


def _explain(message: str, path: str) -> str:
    """The library's message (e.g. "Error while deserializing header: invalid offset for tensor `b`") in words."""
    detail = message.split(": ", 1)[-1]
    size = os.path.getsize(path)
    if detail in ("header too large", "header too small", "invalid header length"):
        with open(path, "rb") as f:
            head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        return (
            f"bad header length {n}: the file has {max(size - 8, 0)} bytes after the 8-byte length field; the file is "
            "truncated or not safetensors"
        )
    if detail.startswith(("invalid JSON in header", "invalid UTF-8 in header")):
        top = re.search(r"invalid type: (\w+), expected struct HashMetadata", detail)
        if top:  # serde's names for what the header is instead of an object
            found = {"sequence": "list", "string": "str", "integer": "int", "floating": "float"}.get(top.group(1))
            return f"header must be a JSON object, got {found or top.group(1)}"
        dtype = re.search(r"unknown variant `([^`]*)`, expected one of (.*) at line", detail)
        if dtype:
            return f"a tensor has unknown dtype {dtype.group(1)!r}; known: {dtype.group(2).replace('`', '')}"
        return f"header is not valid UTF-8 JSON for safetensors ({detail.split(' in header: ', 1)[-1]})"
    offset = re.search(r"invalid offset for tensor `(.*)`", detail)
    if offset:
        return (
            f"tensor {offset.group(1)!r} has invalid data_offsets: each tensor must start where the previous one "
            "ends, without overlap or gap"
        )
    if detail.startswith("incomplete metadata"):
        buffer = size - 8 - len(_header_json(path))
        return (
            f"the tensors' data_offsets do not cover the {buffer}-byte data buffer exactly (they run past its end, or "
            "bytes trail the last tensor); the file is truncated or its header is wrong"
        )
    if detail.startswith("invalid shape, data type, or offset for tensor"):
        return f"{_misfit_tensor(path)}: its byte size does not match its dtype and shape"
    return detail


def _header_json(path: str) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def _refuse_duplicate_keys(path: str) -> None:
    def no_duplicates(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise CheckpointError(f"{path}: duplicate key(s) in header: {dup[:5]}")
        return dict(pairs)

    json.loads(_header_json(path), object_pairs_hook=no_duplicates)


def _misfit_tensor(path: str) -> str:
    """Which tensor's byte span disagrees with numel * itemsize (the library says only that one does)."""
    for name, entry in json.loads(_header_json(path)).items():
        if name == "__metadata__" or entry.get("dtype") not in ITEM_BYTES:
            continue
        begin, end = entry["data_offsets"]
        numel = 1
        for d in entry["shape"]:
            numel *= d
        if end - begin != numel * ITEM_BYTES[entry["dtype"]]:
            return f"tensor {name!r} spans {end - begin} bytes but {entry['dtype']} {entry['shape']} needs " + str(
                numel * ITEM_BYTES[entry["dtype"]]
            )
    return "a tensor"
