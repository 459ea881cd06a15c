"""A safetensors reader that validates the whole header before it trusts a byte of it, then maps the file.

Format (https://github.com/huggingface/safetensors#format): 8-byte little-endian header length N, N bytes of
UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data
buffer; offsets are relative to the buffer. The checks follow the spec and what the reference library enforces
(header at most 100 MB, offsets inside the buffer, tensors laid end to end without overlap or gap, byte size equal
to numel * itemsize), with messages that name the file and the tensor.
"""

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field

import torch

from diffrt.loading.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset into the data buffer
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: str
    header_bytes: int  # N: the data buffer starts at 8 + N
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise CheckpointError(f"duplicate key(s) in header: {dup[:5]}")
    return dict(pairs)


def _parse_entry(name: str, entry: object, data_size: int, where: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{where}: tensor {name!r} must be an object with dtype, shape, data_offsets; got {entry!r}"
        )
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype_name!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: tensor {name!r} has invalid shape {shape!r} (want a list of ints >= 0)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r} (want [begin, end])")
    begin, end = offsets
    if end > data_size:
        raise CheckpointError(
            f"{where}: tensor {name!r} data_offsets [{begin}, {end}] run past the end of the data buffer "
            f"({data_size} bytes); the file is truncated or its header is wrong"
        )
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: tensor {name!r} spans {end - begin} bytes but {dtype_name} {shape} needs {nbytes}"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header (reads only the header, never the data)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: bad header length {n}: the file has {size - 8} bytes after the 8-byte length field "
                f"(and headers are limited to {MAX_HEADER_BYTES} bytes); the file is truncated or not safetensors"
            )
        raw = f.read(n)
    where = f"{path}: header"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where} is not valid UTF-8 JSON ({e}); the file is corrupt or not safetensors") from e
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: __metadata__ must be an object of strings, got {type(metadata).__name__}")

    data_size = size - 8 - n
    tensors = {name: _parse_entry(name, entry, data_size, where) for name, entry in header.items()}

    # Tensors must tile the data buffer: sorted by offset, each starts where the previous one ended.
    pos, prev = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < pos:
            raise CheckpointError(
                f"{where}: tensor {name!r} bytes [{info.begin}, {info.end}] overlap tensor {prev!r} (ends at {pos})"
            )
        if info.begin > pos:
            raise CheckpointError(
                f"{where}: {info.begin - pos} unindexed bytes before tensor {name!r} (offset {pos}..{info.begin})"
            )
        pos, prev = info.end, name
    if pos != data_size:
        raise CheckpointError(
            f"{where}: the tensors cover {pos} bytes but the data buffer has {data_size}; "
            "trailing bytes are not allowed by the format"
        )
    return SafetensorsHeader(path, n, tensors, {str(k): str(v) for k, v in metadata.items()})


def read_safetensors(path: str | os.PathLike, header: SafetensorsHeader | None = None) -> dict[str, torch.Tensor]:
    """Validate, then map the file copy-on-write and return CPU tensors that view it (no copy until written)."""
    header = header or read_header(path)
    path = os.fspath(path)
    base = 8 + header.header_bytes
    out: dict[str, torch.Tensor] = {}
    if base == os.path.getsize(path):  # no data: nothing to map (mmap of an empty range fails)
        return {name: torch.empty(info.shape, dtype=info.dtype) for name, info in header.tensors.items()}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if len(mm) != base + max((i.end for i in header.tensors.values()), default=0):
        raise CheckpointError(f"{path}: the file changed size while being read")
    for name, info in header.tensors.items():
        if info.numel == 0:
            out[name] = torch.empty(info.shape, dtype=info.dtype)
            continue
        t = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=base + info.begin).view(info.shape)
        if (base + info.begin) % info.dtype.itemsize:
            t = t.clone()  # misaligned start (allowed by the format, never written by the reference library)
        out[name] = t
    return out
