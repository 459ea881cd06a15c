"""A real `diffrt serve` process for the serving tests and the load benchmark: started on a free loopback port,
waited for with a bounded timeout, stopped (SIGTERM, then SIGKILL) when done."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 90  # imports, the embedded model's load and its warm-up: a few seconds on an idle 2-core CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(args: list[str], *, faults: list[str] | None = None, env: dict | None = None):
    """Yield (base URL, Popen) of `diffrt serve ARGS` on a free port, ready; `faults` runs it through
    tests/helpers/serve_faults.py (the same server with a fault-injecting pipeline) instead."""
    port = free_port()
    serve = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args]
    if faults is None:
        cmd = [sys.executable, "-m", "diffrt.cli", "serve", *serve]
    else:
        cmd = [sys.executable, "-m", "tests.helpers.serve_faults", *faults, "--", *serve]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"diffrt-serve-{port}.log"), "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url, proc
    finally:
        stop(proc)
        log.close()


def wait_ready(url: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    log.seek(0)
    raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S} s:\n{log.read()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
