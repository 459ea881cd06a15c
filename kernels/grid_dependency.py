"""Programmatic dependent launch (Hopper's grid dependency control) for diffrt's kernels.

Inside a CUDA graph a kernel still starts only once its predecessor has finished and flushed its memory: at batch 1
the UNet step is ~570 kernels of a few microseconds each, so that gap is a share of the step. Launched with
programmatic stream serialization (Triton's `launch_pdl`), a kernel's programs may be scheduled while the
predecessor's last ones run. Each program then waits at `griddepcontrol.wait` (`gdc_wait`) for the predecessor's
completion and memory before its first load or store, and at once allows its own dependents to be scheduled
(`gdc_launch_dependents`, which takes effect when every one of its programs has issued it). The order of memory
effects is unchanged, since every kernel waits for all of its predecessor's writes; only the launch overlaps. A
kernel after a cuBLAS or cuDNN one gains the launch alone, one before them nothing. CUDA programming guide,
"Programmatic Dependent Launch and Synchronization"; Triton's tutorial 11.

Off unless ENABLED (the ablation's "+ programmatic dependent launch" turns it on while it captures;
benchmarks/NOTES_kernels.md, run 23), and never under the interpreter or before sm_90.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

from diffrt.kernels._autotune import INTERPRET

ENABLED = False


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


_OFF = {"PDL": False, "launch_pdl": False}
_ON = {"PDL": True, "launch_pdl": True}


def launch_options(device: torch.device) -> dict:
    """A kernel launch's keyword arguments: its PDL constexpr and Triton's launch_pdl option, both the same (a
    shared dict: the launches only unpack it)."""
    if not ENABLED or INTERPRET or device.type != "cuda":
        return _OFF
    return _ON if _supported(device.index if device.index is not None else torch.cuda.current_device()) else _OFF


@contextlib.contextmanager
def enabled(on: bool = True):
    """ENABLED for the calls (and graph captures) inside the block; the kernels launched there keep it when
    replayed, since it is compiled in."""
    global ENABLED
    previous, ENABLED = ENABLED, on
    try:
        yield
    finally:
        ENABLED = previous


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """A kernel's first statement: with PDL, wait for the previous kernel's memory, then let the next one start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
