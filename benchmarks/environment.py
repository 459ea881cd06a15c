"""What every benchmark result row names: the GPU (or that there was none), driver, library versions (the peers'
too: diffusers, transformers, StreamDiffusion, ONNX Runtime, None where not installed), commit, date, and the call
that measured it: a ratio is honest only between rows of one call (one host, one GPU, one warm state), and two calls
of one commit are not one call. `DIFFRT_CALL` names it (the device scripts set it once per device call); without it,
each process is a call of its own.

The commit comes from `--commit` where given: a device machine's copy of the tree may carry stale git metadata (it
once named the previous commit), so device calls pass the commit they run explicitly.
"""

import datetime
import importlib.metadata
import os
import subprocess
import uuid

import torch


def _command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


PROCESS_CALL = uuid.uuid4().hex[:12]  # this process's call, where the device script named none
PEER_PACKAGES = ("diffusers", "transformers", "streamdiffusion", "onnxruntime-gpu", "onnxruntime")


def _version(package: str) -> str | None:
    try:  # the distribution's metadata, without importing it (diffusers takes seconds to import)
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(commit: str | None = None) -> dict:
    cuda = torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else ""
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (cpu)",
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "driver": driver or None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        **{package: _version(package) for package in PEER_PACKAGES},
        "commit": commit or _command_output(["git", "rev-parse", "HEAD"]) or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "call": os.environ.get("DIFFRT_CALL") or PROCESS_CALL,
    }
