"""What the server does when things go wrong, against a real server process whose pipeline is slowed down and made
to run out of memory on cue (tests/helpers/serve_faults.py): a full queue is a 429 with Retry-After, a request past
its timeout is stopped and answered 504, a client that disconnects stops the work mid-run, an out-of-memory is a
503 and the next request is served, and a request the memory budget cannot fit is refused before any work."""

import re
import threading
import time

import httpx
import pytest

from tests.helpers.serve_process import server_process

openai = pytest.importorskip("openai", reason="the serve tests need the test extra (openai)")
STEP_S = 0.25  # the injected time per step
TIMEOUT_S = 4
PROMPT = "a red circle in the center, blue background"


@pytest.fixture(scope="module")
def slow():
    faults = ["--step-delay", str(STEP_S), "--oom-marker", "OOMNOW"]
    with server_process(["--max-queue", "1", "--timeout", str(TIMEOUT_S)], faults=faults) as (url, proc):
        yield url


def generate(url: str, steps: int, prompt: str = PROMPT, timeout: float = 30) -> httpx.Response:
    body = {"prompt": prompt, "size": "64x64", "steps": steps, "seed": 0}
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples (every label set)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def in_thread(fn, *args):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", fn(*args)))
    thread.start()
    return thread, out


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_full_queue_gets_429_with_retry_after(slow):
    steps_before = metric(slow, "diffrt_denoise_steps_total")
    running, a = in_thread(generate, slow, 8)  # 2 s on the worker
    wait_until(lambda: metric(slow, "diffrt_denoise_steps_total") > steps_before)  # running, so not in the queue
    queued, b = in_thread(generate, slow, 4)
    wait_until(lambda: httpx.get(f"{slow}/health", timeout=5).json()["queue"]["depth"] == 1)
    r = generate(slow, 4)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "queue is full" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{slow}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.images.generate(prompt=PROMPT, extra_body={"steps": 4})
    running.join(30)
    queued.join(30)
    assert a["r"].status_code == 200 and b["r"].status_code == 200  # what was accepted was answered


def test_a_request_past_its_timeout_is_stopped_and_answered_504(slow):
    t0 = time.monotonic()
    r = generate(slow, 40)  # 10 s of work against a 4 s timeout
    seconds = time.monotonic() - t0
    assert r.status_code == 504, r.text
    message = r.json()["error"]["message"]
    assert f"timed out after {TIMEOUT_S} s" in message and "of 40 steps" in message
    assert TIMEOUT_S - 0.5 < seconds < TIMEOUT_S + 2
    done = int(re.search(r"(\d+) of 40 steps", message)[1])
    assert done < 40 * 0.6, f"{done} steps ran: the work was not stopped at its deadline"


def test_a_client_that_disconnects_stops_the_work(slow):
    cancelled_before = metric(slow, 'diffrt_requests_total{endpoint="/v1/images/generations",status="499"}')
    steps_before = metric(slow, "diffrt_denoise_steps_total")
    with pytest.raises(httpx.ReadTimeout):
        generate(slow, 12, timeout=1.0)  # 3 s of work; the client hangs up after 1 s
    wait_until(lambda: metric(slow, 'diffrt_requests_total{endpoint="/v1/images/generations",status="499"}')
               > cancelled_before, timeout=5)  # fmt: skip
    time.sleep(2 * STEP_S)  # the step in flight when the flag was set ends, and is the last
    steps = metric(slow, "diffrt_denoise_steps_total")
    time.sleep(4 * STEP_S)
    assert metric(slow, "diffrt_denoise_steps_total") == steps, "steps still run after the client left"
    assert steps - steps_before < 12, f"all {steps - steps_before} steps ran for a client that left"
    t0 = time.monotonic()
    assert generate(slow, 4).status_code == 200 and time.monotonic() - t0 < 3  # the worker was free at once


def test_out_of_memory_is_an_error_response_and_the_server_goes_on(slow):
    r = generate(slow, 4, prompt=f"{PROMPT} OOMNOW")
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "out_of_memory" and "ran out of memory" in error["message"]
    assert "smaller size or fewer images" in error["message"]
    assert httpx.get(f"{slow}/health", timeout=5).json()["status"] == "ok"
    assert generate(slow, 4).status_code == 200


def test_what_the_memory_budget_cannot_fit_is_refused_before_any_work():
    """A 30 MiB budget: the embedded model's decode needs 6 MiB per 64x64 image and 24 MiB at 128x128 (diffrt.memory),
    so 128x128 is the largest side; two such images decode one at a time (diffrt.tiled_decode) instead of being
    refused."""
    with server_process(["--no-warmup"], faults=["--memory-budget-mb", "30"]) as (url, _):
        limits = httpx.get(f"{url}/health", timeout=5).json()["limits"]
        assert limits["max_n"] == 10 and 128 <= limits["max_side"] < 144, limits
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "size": "144x144"}, timeout=30)
        assert r.status_code == 400 and "width 144 is over this server's limit of" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "n": 11}, timeout=30)
        assert r.status_code == 400 and "n 11 is outside this server's range 1..10" in r.json()["error"]["message"]
        assert metric(url, "diffrt_denoise_steps_total") == 0  # refused before any work
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "size": "128x128", "n": 2},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
