"""One model's GPU worker: a thread that runs its generations one at a time from a bounded queue.

One job at a time per model keeps a pipeline from being driven by two threads at once (the crash and mixed images
users of other servers report) and makes memory use predictable. The queue in front of it is bounded: a full queue
is refused at once (the server answers 429 with Retry-After) instead of growing without end. The bound counts the
job that runs as well as those waiting (`max_queue + 1` in all), and a job gives its place back before its outcome
is published: a client answered can send its next request at once and find room, as Ray's `max_ongoing_requests`
(the same `max_queue + 1`) promises it. Each job carries a
deadline and a cancel flag that the pipeline's per-step callback checks, so a request whose client went away, or
whose time ran out, stops between two denoising steps instead of running to the end.
"""

import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffrt.request import GenerationRequest

log = logging.getLogger("diffrt.serve")
# torch >= 2.5 has torch.OutOfMemoryError; before, the CUDA one was the only kind (it is an alias of it since).
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
Progress = Callable[[int, int], None]  # (steps done, steps in all), called from the worker thread


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: int) -> None:
        super().__init__(f"the queue is full ({depth} requests waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """The job was cancelled (its client disconnected); its work stopped at the next step."""


class TimedOut(Exception):
    """The job's deadline passed; its work stopped at the next step."""


class OutOfMemory(Exception):
    """The device ran out of memory for this job; its memory was given back and the worker goes on."""


@dataclass(eq=False)
class Job:
    """One unit of work for the worker: run(callback) on the worker thread; its outcome in `future`."""

    run: Callable[[Callable], object]  # run(step_callback) -> result; the callback raises to stop it
    steps: int  # steps the run will report (for progress and messages)
    timeout_s: float
    on_progress: Progress | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    steps_done: int = 0
    holds_place: bool = True  # counted in the worker's bound until its outcome is published
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout_s

    def cancel(self) -> None:
        """Stop this job: dropped if still queued, stopped at its next step if running."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def where(self) -> str:
        """How far it got, for error messages."""
        now = time.monotonic()
        if self.started is None:
            return f"queued {now - self.submitted:.1f} s, not started"
        return (f"queued {self.started - self.submitted:.1f} s, ran {now - self.started:.1f} s, "
                f"{self.steps_done} of {self.steps} steps")  # fmt: skip


def run_steps(request: GenerationRequest) -> int:
    """Denoising steps a resolved request runs (img2img runs the last `strength` share of the schedule)."""
    return request.steps if request.image is None else int(request.steps * request.strength)


class ModelWorker:
    """Runs one pipeline's jobs on one thread, in order, with at most `max_queue` waiting behind the one running."""

    def __init__(self, pipeline, *, max_queue: int, metrics=None, name: str = "model") -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue {max_queue} must be >= 1")
        self.pipeline, self.metrics, self.max_queue = pipeline, metrics, max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by `_places`, not by its own size
        self._places = threading.Semaphore(max_queue + 1)  # the jobs waiting and the one running
        self._thread = threading.Thread(target=self._loop, name=f"diffrt-worker-{name}", daemon=True)
        self._durations: deque[float] = deque(maxlen=32)  # recent run times, for Retry-After
        self.ready = threading.Event()  # the warm-up ran: weights loaded, the default shape's graphs built
        self.running: Job | None = None
        self.warmup_error: BaseException | None = None

    def start(self, warmup: GenerationRequest | None = None) -> None:
        self._warmup = warmup
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._queue.qsize()

    def submit_request(self, request: GenerationRequest, *, timeout_s: float, on_progress: Progress | None = None):
        """Queue a resolved request; QueueFull if the queue is full. Returns its Job."""

        def run(callback):
            return self.pipeline.generate(request, callback=callback)

        return self.submit(run, steps=run_steps(request), timeout_s=timeout_s, on_progress=on_progress)

    def submit(self, run: Callable[[Callable], object], *, steps: int, timeout_s: float,
               on_progress: Progress | None = None) -> Job:  # fmt: skip
        """Queue any work on this model's thread (run(step_callback) -> result): another route (a stream, say)
        shares the one-job-at-a-time rule and the queue bound this way."""
        if not self._places.acquire(blocking=False):
            raise QueueFull(self.max_queue, self.retry_after_s())
        job = Job(run, steps, timeout_s, on_progress)
        self._queue.put_nowait(job)
        self._gauge()
        return job

    def retry_after_s(self) -> int:
        """Seconds until a place in the queue is likely free: the recent mean run time times the jobs ahead."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, min(60, math.ceil(mean * (self.depth + 1))))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel what is queued and running, then end the thread."""
        if self.running is not None:
            self.running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self._finish(job, exception=Cancelled("the server is shutting down"))
        self._queue.put_nowait(None)
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        if self._warmup is not None:
            try:
                self.pipeline.generate(self._warmup)
            except BaseException as e:  # reported by /ready and /health; the server must not start serving
                log.exception("warm-up failed")
                self.warmup_error = e
                return
        self.ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._gauge()
            self.running = job
            try:
                self._run(job)
            finally:
                self.running = None
                self._give_back_place(job)  # a job its client cancelled ends without an outcome of ours

    def _run(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        if job.cancelled:
            return self._finish(job, exception=Cancelled("cancelled before it started"))
        if time.monotonic() > job.deadline:
            return self._finish(job, exception=TimedOut(f"timed out after {job.timeout_s:g} s ({job.where()})"))
        job.started = time.monotonic()

        def step(i: int, *_) -> None:  # after every denoising step: the only place a run can be stopped
            job.steps_done = i + 1
            if self.metrics is not None:
                self.metrics.steps.inc()
            if job.cancelled:
                raise Cancelled(f"cancelled by its client ({job.where()})")
            if time.monotonic() > job.deadline:
                raise TimedOut(f"timed out after {job.timeout_s:g} s ({job.where()})")
            if job.on_progress is not None:
                job.on_progress(job.steps_done, job.steps)

        try:
            result = job.run(step)
        except (Cancelled, TimedOut) as e:
            self._finish(job, exception=e)
        except OUT_OF_MEMORY as e:
            self._recover_memory()
            self._finish(job, exception=OutOfMemory(f"the device ran out of memory ({job.where()}): {e}"))
        except Exception as e:  # a bug or a backend failure fails this request, never the worker
            log.exception("generation failed")
            self._finish(job, exception=e)
        else:
            self._durations.append(time.monotonic() - job.started)
            self._finish(job, result=result)

    def _recover_memory(self) -> None:
        """Give what the failed run held back to the device, so that the next job starts from a clean pool."""
        if self.pipeline.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.pipeline.device)
            torch.cuda.empty_cache()

    def _give_back_place(self, job: Job) -> None:
        if job.holds_place:
            job.holds_place = False
            self._places.release()

    def _finish(self, job: Job, *, result=None, exception: BaseException | None = None) -> None:
        self._give_back_place(job)  # before the outcome: whoever it wakes may submit again at once
        if job.future.done():
            return
        if exception is not None:
            job.future.set_exception(exception)
        else:
            job.future.set_result(result)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)
