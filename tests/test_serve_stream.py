"""`diffrt serve` carries the real-time stream: its /stream page and WebSocket over the served model, in a real
server process; off with --api-key (a browser's WebSocket cannot send the Authorization header)."""

import io
import json

import httpx
from PIL import Image
from websockets.sync.client import connect

from tests.helpers.serve_process import server_process
from tests.helpers.stream_fixtures import RED_CIRCLE, frames


def test_the_server_streams_frames_at_its_model_size():
    with server_process(["--no-warmup", "--stream-sessions", "1"]) as (url, _):
        page = httpx.get(f"{url}/stream", timeout=10)
        assert page.status_code == 200 and "<canvas" in page.text.lower()
        ws_url = url.replace("http://", "ws://") + f"/stream/ws?prompt={RED_CIRCLE.replace(' ', '%20')}"
        with connect(ws_url, open_timeout=30) as ws:
            ready = json.loads(ws.recv(timeout=60))
            assert ready["type"] == "ready" and (ready["width"], ready["height"]) == (64, 64), ready
            sent = frames(ready["delay_frames"] + 1, seed=3)
            for pixels in sent:
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="PNG")
                ws.send(out.getvalue())
            report = json.loads(ws.recv(timeout=60))
            assert report["type"] == "frame" and report["index"] == 0 and report["status"] == "done", report
            picture = Image.open(io.BytesIO(ws.recv(timeout=60)))
            assert picture.size == (64, 64)


def test_an_api_key_turns_the_stream_off():
    with server_process(["--no-warmup", "--api-key", "k"]) as (url, _):
        assert httpx.get(f"{url}/stream", timeout=10).status_code == 404
