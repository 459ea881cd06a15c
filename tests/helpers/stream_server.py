"""Test-only: a minimal FastAPI app around the stream router, served by uvicorn on a free loopback port in a thread
of the test process (started and stopped by a fixture)."""

import socket
import threading
import time
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI


@contextmanager
def serve(router, startup_s: float = 20.0):
    """Yields the base URL ("http://127.0.0.1:PORT") of `router` mounted on a fresh app."""
    app = FastAPI()
    app.include_router(router)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the port is ours from here on: no race with another process picking it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
