"""Prompt embeddings cached per (prompts, clip_skip): a repeated prompt costs no text-encoder pass."""

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from torch import Tensor

Embeddings = tuple[Tensor, Tensor | None]


class PromptCache:
    """A bounded least-recently-used cache, safe under concurrent calls: two threads asking for the same missing
    key both compute it (the encoder is pure, so either result is right) and neither sees a half-updated table."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, Embeddings] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Embeddings]) -> Embeddings:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = compute()  # outside the lock: a slow encode does not hold up hits for other prompts
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
