"""Frames in, reports out in frame order: every frame given to a stream gets exactly one report, in the order the
frames came, whether it was drawn, skipped by the similarity filter (a repeat of an earlier frame's picture, flagged
as such) or dropped by its caller (a server that fell behind)."""

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

DONE, SKIPPED, DROPPED = "done", "skipped", "dropped"


@dataclass
class StreamFrame:
    """The report of one input frame (or txt2img image)."""

    index: int  # 0, 1, 2, ... in the order frames were given
    status: str  # DONE: drawn; SKIPPED: near-identical to frame repeat_of, whose picture it repeats; DROPPED: none
    picture: np.ndarray | None  # uint8 [H, W, 3]; None when dropped
    latency_ms: float | None  # from the frame's submission to its picture on the host (stream batch: a few calls)
    repeat_of: int | None = None  # SKIPPED: the drawn frame whose picture this is

    @property
    def skipped(self) -> bool:
        return self.status == SKIPPED


class _Record:
    def __init__(self, index: int, status: str, source: "_Record | None" = None) -> None:
        self.index, self.status, self.source = index, status, source
        self.submitted = time.perf_counter()
        self.picture: np.ndarray | None = None
        self.latency_ms: float | None = None

    def finish(self, picture: np.ndarray) -> None:
        self.picture, self.latency_ms = picture, (time.perf_counter() - self.submitted) * 1000

    @property
    def ready(self) -> bool:
        if self.status == DROPPED:
            return True
        return (self.source or self).picture is not None


class FrameOrder:
    """The reports not yet handed out, oldest first; a report leaves only once it and all before it are ready."""

    def __init__(self) -> None:
        self.next_index = 0
        self._waiting: deque[_Record] = deque()

    def _add(self, status: str, source: _Record | None = None) -> _Record:
        record = _Record(self.next_index, status, source)
        self.next_index += 1
        self._waiting.append(record)
        return record

    def admit(self) -> _Record:
        """A frame that will be drawn: its record awaits the picture (record.finish)."""
        return self._add(DONE)

    def skip(self, like: _Record) -> _Record:
        """A frame that repeats the picture of the admitted frame `like`."""
        return self._add(SKIPPED, like)

    def drop(self) -> _Record:
        return self._add(DROPPED)

    def ready(self) -> list[StreamFrame]:
        out = []
        while self._waiting and self._waiting[0].ready:
            r = self._waiting.popleft()
            if r.status == SKIPPED:
                r.latency_ms = (time.perf_counter() - r.submitted) * 1000
            picture = r.picture if r.source is None else r.source.picture
            out.append(StreamFrame(r.index, r.status, picture, r.latency_ms, r.source.index if r.source else None))
        return out

    def __len__(self) -> int:
        return len(self._waiting)
