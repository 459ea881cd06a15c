"""An export folder's files checked before any of them is parsed into a session or an engine.

What the `onnx` library enforces (1.23; CVE-2022-25882, CVE-2024-27318, CVE-2026-27489): an external-data location
must be relative, stay inside the model's folder, and be neither a symbolic link nor a file with several hard links.
`onnx.checker.check_model(path)` applies exactly those rules without reading the weights, so it runs first.

What it does not, added here:
- the model file itself: a `.onnx` (or the manifest) that is a symlink or a hard link could be a file from anywhere;
  ONNX Runtime and TensorRT open whatever the path resolves to;
- the data's bounds: the checker does not compare each tensor's offset + length with its file's size (onnx.load does,
  ONNX Runtime does, a TensorRT parser may not);
- the manifest: every file it lists must exist with its recorded size and sha256, a model may reference only the
  external-data files the manifest lists for it, and listed names stay inside the folder.
"""

import os
import stat

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from diffrt.export.files import sha256_file
from diffrt.loading.errors import CheckpointError


def contained_path(folder: str, name: str, what: str) -> str:
    """`folder/name` for a name a manifest gave: relative, no `..`, and not a link of any kind."""
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or not name:
        raise CheckpointError(f"{folder}: {what} {name!r} is not a plain relative path inside the export folder")
    path = os.path.join(folder, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: {what} {name!r} is missing; export again (diffrt export)") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{folder}: {what} {name!r} is a symbolic link; an export folder holds its own files")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{folder}: {what} {name!r} is not a regular file")
    if st.st_nlink > 1:
        raise CheckpointError(
            f"{folder}: {what} {name!r} has {st.st_nlink} hard links, so it may be a file from outside the folder; "
            "copy it instead of linking"
        )
    real = os.path.realpath(path)
    if os.path.commonpath([real, os.path.realpath(folder)]) != os.path.realpath(folder):
        raise CheckpointError(f"{folder}: {what} {name!r} resolves outside the export folder")
    return path


def check_file(folder: str, entry: dict, what: str) -> str:
    """A manifest entry {"file", "bytes", "sha256"}: contained, and its size and hash as recorded."""
    path = contained_path(folder, entry["file"], what)
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise CheckpointError(
            f"{folder}: {entry['file']} is {size} bytes, its manifest says {entry['bytes']}: the file was changed, "
            "truncated or replaced; export again"
        )
    if sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{folder}: {entry['file']} does not match its manifest's sha256; export again")
    return path


def check_onnx(folder: str, entry: dict) -> str:
    """A component's `.onnx` and its external data, checked against its manifest entry; returns the model's path."""
    path = contained_path(folder, entry["file"], "model")
    try:  # onnx's own rules for external data (relative, contained, no symlink, no hard link), weights unread
        onnx.checker.check_model(path)
    except (onnx.checker.ValidationError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: refused by onnx's checker: {e}") from e
    listed = {d["file"]: d for d in entry.get("external_data", [])}
    model = onnx.load(path, load_external_data=False)
    referenced = {}
    for tensor in _tensors(model):
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            referenced.setdefault(info.location, []).append((tensor.name, info))
    unlisted = sorted(set(referenced) - set(listed))
    if unlisted:
        raise CheckpointError(
            f"{path}: references external data {unlisted} that its manifest does not list; refusing to read it"
        )
    for name, data in listed.items():
        data_path = check_file(folder, data, "external data")
        size = os.path.getsize(data_path)
        for tensor_name, info in referenced.get(name, []):
            end = (info.offset or 0) + (info.length if info.length is not None else 0)
            if info.length is None or end > size:
                raise CheckpointError(
                    f"{path}: tensor {tensor_name!r} reads bytes {info.offset or 0}..{end} of {name} "
                    f"({size} bytes){'' if info.length is not None else ' with no length'}; the file is corrupt"
                )
    return check_file(folder, entry, "model")


def _tensors(model: onnx.ModelProto):
    """Initializers and Constant-node tensors, subgraphs included (where external data can hide)."""
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
