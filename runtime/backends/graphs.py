"""CUDA-graph capture and replay of a function of tensors, the machinery under the cuda-graph backend.

A `CapturedCall` holds one graph for one set of input shapes: the caller copies its inputs into the static buffers
the graph reads, replays it and gets clones of its outputs. Every graph on a device allocates from that device's one
memory pool and runs under that device's one lock (stable-fast's make_dynamic_graphed_callable does the same):
graphs that share a pool may reuse each other's temporaries, so one replay, and the cloning of its outputs, must
finish before another starts. Cloning the outputs also means a caller never holds memory the next replay overwrites.
"""

import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_pools: dict[torch.device, tuple] = {}
_live: dict[tuple, int] = {}  # graphs alive per pool: a pool whose graphs are all gone must not be captured into again
_locks: dict[torch.device, threading.RLock] = {}
_registry_lock = threading.Lock()


def _acquire_pool(device: torch.device) -> tuple:
    """The memory pool every live graph on `device` shares; a fresh one once the last graph of the old one is gone
    (torch frees a pool with its last graph, and refuses captures into it afterwards)."""
    with _registry_lock:
        pool = _pools.get(device)
        if pool is None or _live.get(pool, 0) == 0:
            pool = _pools[device] = torch.cuda.graph_pool_handle()
        _live[pool] = _live.get(pool, 0) + 1
        return pool


def _release_pool(pool: tuple) -> None:
    with _registry_lock:
        _live[pool] -= 1


def device_lock(device: torch.device) -> threading.RLock:
    """Held around every capture and every replay (with its input copies and output clones) on `device`."""
    with _registry_lock:
        return _locks.setdefault(device, threading.RLock())


class CapturedCall:
    """`fn() -> tuple of tensors`, a function of static buffers it closes over, captured into one graph.

    Construction runs `fn` once on a side stream (kernel compilation, autotuning, cuDNN's algorithm choice and the
    allocator's first requests happen there, outside the graph), then captures it. `fn` must issue device work only:
    no host sync, no host-to-device copy of fresh host data, no branching on tensor values. Callers fill the static
    buffers and call `replay` under `device_lock`.
    """

    def __init__(self, fn: Callable[[], Sequence[Tensor]], device: torch.device) -> None:
        self.device = device
        # The graph reads every tensor fn's closure holds (timestep tables, static buffers): they live as long as it.
        self.fn = fn
        with device_lock(device):
            before = torch.cuda.memory_reserved(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            pool = _acquire_pool(device)
            weakref.finalize(self, _release_pool, pool)
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = tuple(fn())
            torch.cuda.synchronize(device)
            self.pool_bytes = torch.cuda.memory_reserved(device) - before  # what capturing this graph added
        self.replays = 0

    def replay(self) -> tuple[Tensor, ...]:
        """Replay and return clones of the outputs (the next replay overwrites the graph's own)."""
        self.graph.replay()
        self.replays += 1
        return tuple(t.clone() for t in self.outputs)


def signature(tensors: Sequence[Tensor | None]) -> tuple:
    """What fixes a graph's inputs: each tensor's shape and dtype (None for an absent one)."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)
