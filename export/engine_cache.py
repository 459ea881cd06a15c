"""TensorRT engines cached on disk, keyed by everything that makes an engine valid, and checked before any is used.

An engine is valid only for the ONNX it was built from (the model's and its external data's sha256), the TensorRT
flavour and version that built it, the GPU and compute capability it was built for, its optimization profile, its
precision and builder options. Those fields hash to the cache key (the file name), and they are also recorded in the
engine's metadata file, so a stale or tampered entry is caught even under its own name:

    DIR/unet-<key>.plan    the serialized engine, written atomically (temp file + rename)
    DIR/unet-<key>.json    its fields, byte count and sha256, written after the engine: the entry's commit point

An entry is used only when its metadata records exactly the requested fields and the engine file is a regular file
of the recorded size and sha256; otherwise (truncated, corrupt, built by another TensorRT or for another GPU, a
profile or precision that differs, no metadata) it is rebuilt, and the reason is reported. An engine the runtime then
fails to deserialize is rebuilt once, and an error if the new one fails too: an engine that failed a check is never
handed to the runtime.
"""

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from diffrt.export.files import sha256_file, write_atomically

Builder = Callable[[str, "EngineRequest"], bytes]  # (onnx path, request) -> serialized engine


@dataclass(frozen=True)
class EngineTarget:
    """The TensorRT and GPU an engine is built with and for."""

    flavour: str  # "tensorrt" (NVIDIA's full TensorRT) or "tensorrt_rtx"
    version: str
    gpu: str  # torch.cuda.get_device_name()
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class EngineRequest:
    """What one engine is built from: a component's ONNX (by hash), its input profile, precision and options."""

    component: str
    onnx_sha256: str  # the model file's and its external data's hashes, hashed together (onnx_identity)
    shapes: dict  # {input: [min, opt, max]}
    precision: str  # "onnx:<dtype>" (strongly typed: the graph's types) or "fp16" / "bf16" (builder flags)
    options: dict = field(default_factory=dict)  # builder optimization level, ...


@dataclass
class CacheResult:
    path: str
    engine: object  # the serialized bytes, or what `deserialize` made of them
    built: bool
    reason: str  # why it was (re)built, or "cached"
    build_seconds: float | None
    bytes: int


def onnx_identity(entry: dict) -> str:
    """One hash for a manifest's component entry: its model file and every external-data file."""
    parts = [entry["sha256"], *(d["sha256"] for d in entry.get("external_data", []))]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


class EngineCache:
    def __init__(self, folder: str | os.PathLike, target: EngineTarget, builder: Builder) -> None:
        self.folder, self.target, self.builder = os.fspath(folder), target, builder
        os.makedirs(self.folder, exist_ok=True)

    def fields(self, request: EngineRequest) -> dict:
        return {"target": asdict(self.target), "request": asdict(request)}

    def key(self, request: EngineRequest) -> str:
        return hashlib.sha256(json.dumps(self.fields(request), sort_keys=True).encode()).hexdigest()[:32]

    def paths(self, request: EngineRequest) -> tuple[str, str]:
        stem = os.path.join(self.folder, f"{request.component}-{self.key(request)}")
        return f"{stem}.plan", f"{stem}.json"

    def problem(self, request: EngineRequest) -> str | None:
        """Why the cached entry for `request` cannot be used (None: it can)."""
        plan, meta_path = self.paths(request)
        if not os.path.lexists(meta_path):
            return "not cached" if not os.path.lexists(plan) else "engine without metadata (an interrupted build)"
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable metadata ({e})"
        wanted = self.fields(request)
        if meta.get("fields") != wanted:
            return "recorded for another build: " + _difference(meta.get("fields") or {}, wanted)
        try:
            st = os.lstat(plan)
        except FileNotFoundError:
            return "engine file missing"
        if not stat.S_ISREG(st.st_mode):
            return "engine path is not a regular file"
        if st.st_size != meta.get("bytes"):
            return f"engine is {st.st_size} bytes, {meta.get('bytes')} were written (truncated or replaced)"
        if sha256_file(plan) != meta.get("sha256"):
            return "engine bytes do not match their recorded sha256 (corrupt)"
        return None

    def get(
        self, onnx_path: str, request: EngineRequest, deserialize: Callable[[bytes], object | None] | None = None
    ) -> CacheResult:
        """The engine for `request`: the cached one if it passes every check, else built from `onnx_path` now.
        deserialize(bytes) -> engine or None: what the runtime makes of it (None: it cannot; then rebuilt once)."""
        plan, _ = self.paths(request)
        reason = self.problem(request)
        if reason is None:
            with open(plan, "rb") as f:
                data = f.read()
            engine = deserialize(data) if deserialize else data
            if engine is not None:
                return CacheResult(plan, engine, False, "cached", None, len(data))
            reason = f"{self.target.flavour} {self.target.version} could not deserialize the cached engine"
        seconds, data = self._build(onnx_path, request)
        engine = deserialize(data) if deserialize else data
        if engine is None:
            raise RuntimeError(
                f"{plan}: {self.target.flavour} {self.target.version} built this engine but cannot deserialize it on "
                f"{self.target.gpu} (compute capability {self.target.compute_capability})"
            )
        return CacheResult(plan, engine, True, reason, seconds, len(data))

    def _build(self, onnx_path: str, request: EngineRequest) -> tuple[float, bytes]:
        plan, meta_path = self.paths(request)
        if os.path.lexists(meta_path):  # uncommit first: a crash mid-build leaves an entry that is not used
            os.unlink(meta_path)
        start = time.perf_counter()
        data = bytes(self.builder(onnx_path, request))
        seconds = time.perf_counter() - start
        if not data:
            raise RuntimeError(f"the {self.target.flavour} builder returned an empty engine for {onnx_path}")
        write_atomically(plan, data)
        meta = {"fields": self.fields(request), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "build_seconds": round(seconds, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        write_atomically(meta_path, json.dumps(meta, indent=1).encode())
        return seconds, data


def _difference(recorded: dict, wanted: dict, prefix: str = "") -> str:
    """The first fields that differ, as "target.gpu 'A' != 'B'"."""
    diffs = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _difference(a, b, f"{prefix}{key}.")
            if sub:
                diffs.append(sub)
        elif a != b:
            diffs.append(f"{prefix}{key} {a!r} != {b!r}")
    return "; ".join(diffs)
