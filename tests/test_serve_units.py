"""The server's parts on their own: limits from the model and a memory budget, the url store's bounds, the worker's
queue bound, cancellation and recovery from a real out-of-memory (on a GPU)."""

import asyncio
import time

import pytest
import torch

import diffrt
from diffrt.assembly import open_model
from diffrt.cli_generate import DEFAULT_MODEL
from diffrt.request import GenerationRequest
from diffrt.serve.image_store import ImageStore
from diffrt.serve.limits import derive_limits
from diffrt.serve.worker import Cancelled, ModelWorker, OutOfMemory, QueueFull

MIB = 2**20


def test_limits_follow_the_memory_budget():
    spec = open_model(DEFAULT_MODEL).spec  # 6 MiB of activations per 64x64 image (fp32, no CFG batch: LCM)
    roomy = derive_limits(spec, torch.device("cpu"), torch.float32, memory_budget=2**40)
    assert (roomy.max_side, roomy.max_n) == (256, 10)  # 4x the default size; OpenAI's n range
    tight = derive_limits(spec, torch.device("cpu"), torch.float32, memory_budget=30 * MIB)
    # 136 pixels a side is the largest single decode that fits; n is not bound by it (images decode one at a time)
    assert tight.max_n == 10 and tight.max_side == 136
    assert tight.problems(n=11, width=144, height=64, steps=101, prompt="x") == [
        "n 11 is outside this server's range 1..10",
        "size: width 144 is over this server's limit of 136 pixels",
        "steps 101 is over this server's limit of 100",
    ]


def test_image_store_is_bounded_in_bytes_and_time():
    store = ImageStore(max_bytes=100, ttl_s=0.2)
    a = asyncio.run(store.put(b"a" * 60, "image/png"))
    b = asyncio.run(store.put(b"b" * 60, "image/png"))  # over 100 bytes: the oldest goes
    assert asyncio.run(store.get(a)) is None and asyncio.run(store.get(b)) == (b"b" * 60, "image/png")
    assert store.size_bytes == 60
    time.sleep(0.25)
    assert asyncio.run(store.get(b)) is None and store.size_bytes == 0
    with pytest.raises(ValueError, match="does not fit"):
        asyncio.run(store.put(b"x" * 101, "image/png"))


class Blocking:
    """A stand-in pipeline whose generation waits for a step signal, so that the test controls the worker."""

    device = torch.device("cpu")

    def __init__(self):
        import threading

        self.go = threading.Event()

    def generate(self, request, callback=None):
        for i in range(request.steps):
            self.go.wait(10)
            callback(i, None, None)
        return "done"


def test_worker_bounds_its_queue_and_cancels():
    pipe = Blocking()
    worker = ModelWorker(pipe, max_queue=1)
    worker.start()
    try:
        request = GenerationRequest("x", steps=3)
        running = worker.submit_request(request, timeout_s=30)
        deadline = time.monotonic() + 5
        while worker.running is None and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = worker.submit_request(request, timeout_s=30)
        with pytest.raises(QueueFull) as full:
            worker.submit_request(request, timeout_s=30)
        assert full.value.retry_after_s >= 1
        queued.cancel()  # dropped without running
        running.cancel()  # stops after its current step
        pipe.go.set()
        with pytest.raises(Cancelled):
            running.future.result(10)
        with pytest.raises(Cancelled, match="before it started"):
            queued.future.result(10)
        assert running.steps_done == 1
    finally:
        worker.stop()


def test_a_job_gives_its_place_back_before_its_client_hears():
    """A client answered sends its next request at once (Ray routes it there: max_ongoing_requests counts the job
    that ran as done). The worker has not yet taken the next job off its queue then, and the new request must still
    find room; a bound on the waiting jobs alone refused it with a 429 (seen in CI with two Ray replicas)."""
    pipe = Blocking()
    worker = ModelWorker(pipe, max_queue=1)
    worker.start()
    request = GenerationRequest("x", steps=1)
    try:
        running = worker.submit_request(request, timeout_s=30)
        deadline = time.monotonic() + 5
        while worker.running is None and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = worker.submit_request(request, timeout_s=30)  # the queue is full now
        followed = []  # the done callback runs on the worker thread, before it takes `waiting` off the queue
        running.future.add_done_callback(lambda _: followed.append(worker.submit_request(request, timeout_s=30)))
        pipe.go.set()
        assert running.future.result(10) == "done"
        assert waiting.future.result(10) == "done"
        assert len(followed) == 1 and followed[0].future.result(10) == "done"
    finally:
        worker.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_out_of_memory_fails_one_request_and_the_worker_goes_on():
    pipe = diffrt.Pipeline.from_pretrained("tiny-sd15", device="cuda", dtype=torch.float16)
    worker = ModelWorker(pipe, max_queue=2)
    worker.start()
    try:
        free, _ = torch.cuda.mem_get_info()
        per_image = pipe.spec.memory.activation_bytes(1, 2048, 2048, 8, torch.float16, cfg=False)
        batch = int(3 * free / per_image) + 1  # three times what the device has free (the memory check is off)
        huge = GenerationRequest("x", steps=1, height=2048, width=2048, batch=batch, check_memory=False)
        with pytest.raises(OutOfMemory, match="ran out of memory"):
            worker.submit_request(huge, timeout_s=300).future.result(300)
        ok = worker.submit_request(GenerationRequest("x", steps=1, seed=0), timeout_s=60).future.result(60)
        assert len(ok.images) == 1
    finally:
        worker.stop()
