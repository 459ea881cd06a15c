"""The stream over HTTP: a FastAPI router with the `/stream` page and its WebSocket, `/stream/ws` (needs the
"serve" extra). Thin: it moves bytes between the socket and a StreamSession (diffrt.stream.session, which documents
the messages) and knows nothing of models.

    app.include_router(stream_router(stream_factory(pipe, StreamConfig(prompt=...)), max_sessions=2))

One Stream per connection, made by the factory from the connection's query options (its own buffers, noise and
frame order: no two users' images mix). At most max_sessions at once: one more is accepted and closed at once with
code 1013 (try again later) and a reason saying so. Sessions take turns on the model (one worker), each frame in a
thread so the event loop keeps receiving. A session that falls behind drops its oldest waiting frame (reported, in
order) once more than max_queued wait; the work stops when its client goes away.
"""

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from importlib import resources

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

from diffrt.stream.session import StreamSession
from diffrt.stream.stream import Stream

SESSIONS_FULL = 1013  # RFC 6455 "Try Again Later"
BAD_OPTIONS = 1008  # RFC 6455 "Policy Violation": the connection's options cannot make a stream


class _Seats:
    """A count of sessions in use, taken and given back under a lock."""

    def __init__(self, size: int) -> None:
        self.size, self.used, self._lock = size, 0, threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.used -= 1


def stream_router(stream_factory: Callable[[dict], Stream], max_sessions: int = 2, *, max_queued: int = 2,
                  path: str = "/stream") -> APIRouter:  # fmt: skip
    """The page at `path` and its WebSocket at `path`/ws; stream_factory(query options) -> a Stream per session."""
    if max_sessions < 1 or max_queued < 1:
        raise ValueError(f"max_sessions {max_sessions} and max_queued {max_queued} must be >= 1")
    router = APIRouter()
    seats = _Seats(max_sessions)
    model_turn = threading.Lock()  # one worker on the model: sessions' frames run one at a time
    page = resources.files("diffrt.stream").joinpath("page.html").read_text()

    async def on_model(fn, *args):
        def run():
            with model_turn:
                return fn(*args)

        return await asyncio.to_thread(run)

    @router.get(path, response_class=HTMLResponse)
    async def stream_page() -> str:
        return page

    @router.websocket(path + "/ws")
    async def stream_socket(websocket: WebSocket) -> None:
        await websocket.accept()
        if not seats.take():
            reason = f"stream sessions full ({seats.size} of {seats.size} in use); try again later"
            await websocket.close(code=SESSIONS_FULL, reason=reason)
            return
        try:
            try:
                stream = await on_model(stream_factory, dict(websocket.query_params))
            except ValueError as e:
                await websocket.close(code=BAD_OPTIONS, reason=str(e)[:120])  # a close reason holds 123 bytes
                return
            session = StreamSession(stream)
            await websocket.send_json(session.hello())
            await _serve(websocket, session, on_model, max_queued)
        finally:
            seats.give_back()

    return router


async def _serve(websocket: WebSocket, session: StreamSession, on_model, max_queued: int) -> None:
    """Receive into a queue while a worker drains it; frames beyond max_queued waiting replace the oldest with a
    drop. Ends when the client disconnects (the frame in work finishes; the rest is discarded)."""
    items: deque[tuple[str, object]] = deque()
    arrived = asyncio.Event()

    async def receive() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                waiting = [i for i, (kind, _) in enumerate(items) if kind == "frame"]
                if len(waiting) >= max_queued:
                    items[waiting[0]] = ("drop", None)
                items.append(("frame", message["bytes"]))
            elif message.get("text") is not None:
                items.append(("text", message["text"]))
            arrived.set()

    async def work() -> None:
        while True:
            await arrived.wait()
            arrived.clear()
            while items:
                kind, data = items.popleft()
                handle = {"frame": session.frame, "text": session.message, "drop": lambda _: session.drop()}[kind]
                for out in await on_model(handle, data):
                    await (websocket.send_bytes(out) if isinstance(out, bytes) else websocket.send_json(out))

    receiver, worker = asyncio.create_task(receive()), asyncio.create_task(work())
    try:
        await asyncio.wait({receiver, worker}, return_when=asyncio.FIRST_COMPLETED)
        # The worker failing while its client is still there is a bug (the connection closes with 1011); failing
        # because the client left (a send after the close) is the end of the session.
        if worker.done() and not receiver.done() and worker.exception() is not None:
            if not isinstance(worker.exception(), WebSocketDisconnect):
                raise worker.exception()
    finally:
        for task in (receiver, worker):
            task.cancel()
        await asyncio.gather(receiver, worker, return_exceptions=True)
