"""The stream's WebSocket endpoint through a real server (uvicorn on a loopback port) and a real client
(websockets): frames come back complete and in order, two concurrent sessions each get their own prompt's pictures
(read by the adherence judge), a malformed frame gets an error and the session goes on, the session cap is
enforced with a clear refusal, and the /stream page is served."""

import io
import json
import threading
import time
import urllib.request
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import diffrt
from diffrt.cli_generate import DEFAULT_MODEL
from diffrt.stream import StreamConfig
from diffrt.stream.routes import SESSIONS_FULL, stream_router
from diffrt.stream.session import stream_factory
from diffrt.train import judge as judge_lib
from diffrt.train import shapes
from tests.helpers.stream_fixtures import BLUE_SQUARE, RED_CIRCLE, frames, one_thread  # noqa: F401 (a fixture)
from tests.helpers.stream_server import serve

# Two LCM steps (999 and 499 of 4): the embedded model follows its prompt at two steps (99% adherence, README).
DEFAULTS = StreamConfig(prompt=RED_CIRCLE, height=64, width=64, steps=(0, 2), num_inference_steps=4)


@pytest.fixture(scope="module")
def pipe() -> diffrt.Pipeline:
    return diffrt.Pipeline.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def server(pipe):
    with serve(stream_router(stream_factory(pipe, DEFAULTS), max_sessions=2)) as url:
        yield url


def socket_url(base: str, **query) -> str:
    return base.replace("http://", "ws://") + "/stream/ws" + (f"?{urlencode(query)}" if query else "")


class Client:
    """One session (a context manager): sends frames and messages, collects the server's messages in order."""

    def __init__(self, base: str, **query) -> None:
        self.url, self.errors = socket_url(base, **query), []

    def __enter__(self) -> "Client":
        self._connection = connect(self.url, open_timeout=30)
        self.ws = self._connection.__enter__()
        self.ready = json.loads(self.ws.recv(timeout=60))
        return self

    def __exit__(self, *exc) -> None:
        self._connection.__exit__(*exc)

    def send_frame(self, pixels: np.ndarray) -> None:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        self.ws.send(out.getvalue())

    def reports(self, count: int) -> list[tuple[dict, np.ndarray | None]]:
        """The next `count` frame reports with their pictures (error messages are kept aside)."""
        got = []
        while len(got) < count:
            message = json.loads(self.ws.recv(timeout=60))
            if message["type"] == "error":
                self.errors.append(message)
            elif message["type"] == "frame":
                picture = None
                if message["status"] != "dropped":
                    data = self.ws.recv(timeout=60)
                    assert isinstance(data, bytes) and len(data) == message["bytes"]
                    picture = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                got.append((message, picture))
        return got

    def message(self, **fields) -> dict:
        self.ws.send(json.dumps(fields))
        return json.loads(self.ws.recv(timeout=60))

    def stream(self, inputs: list[np.ndarray]) -> list[tuple[dict, np.ndarray | None]]:
        """Frames in lockstep with the stream's delay (never more than delay + 1 unanswered), then a flush."""
        delay, out = self.ready["delay_frames"], []
        for i, pixels in enumerate(inputs):
            self.send_frame(pixels)
            if i >= delay:
                out += self.reports(1)
        self.ws.send(json.dumps({"flush": True}))
        return out + self.reports(len(inputs) - len(out))


def test_frames_come_back_complete_and_in_order(server, pipe):
    """Each frame gets one report, in order, with a 64x64 JPEG; it is the picture diffrt.Stream draws for that
    frame (JPEG at quality 85 keeps it within a few levels)."""
    inputs = frames(4, seed=1)
    with Client(server) as client:
        assert client.ready == {"type": "ready", "width": 64, "height": 64, "mode": "img2img", "steps": [0, 2],
                                "delay_frames": 1, "guidance": "none", "prompt": RED_CIRCLE}  # fmt: skip
        got = client.stream(inputs)
    assert [m["index"] for m, _ in got] == [0, 1, 2, 3] and {m["status"] for m, _ in got} == {"done"}
    assert all(m["latency_ms"] > 0 for m, _ in got)
    direct = diffrt.Stream(pipe, DEFAULTS)
    expected = [r.picture for f in inputs for r in direct(f)] + [r.picture for r in direct.flush()]
    for (_, picture), want in zip(got, expected, strict=True):
        assert picture.shape == (64, 64, 3)
        assert np.abs(picture.astype(int) - want.astype(int)).mean() < 4


def test_two_sessions_each_get_their_own_prompts_pictures(server):
    """Two clients at once on the same frames, one asking for a red circle, the other for a blue square: the judge
    reads each session's own prompt in every one of its pictures, and never the other's."""
    inputs = frames(3, seed=2)
    results: dict[str, list] = {}

    def session(prompt: str) -> None:
        with Client(server, prompt=prompt) as client:
            results[prompt] = [picture for _, picture in client.stream(inputs)]

    threads = [threading.Thread(target=session, args=(p,)) for p in (RED_CIRCLE, BLUE_SQUARE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    judge = judge_lib.load_judge()
    for prompt, other in [(RED_CIRCLE, BLUE_SQUARE), (BLUE_SQUARE, RED_CIRCLE)]:
        pictures = np.stack(results[prompt])
        own = judge_lib.adherence(judge, pictures, [shapes.parse_caption(prompt)] * len(pictures))
        theirs = judge_lib.adherence(judge, pictures, [shapes.parse_caption(other)] * len(pictures))
        assert own["all"] == 1.0 and theirs["all"] == 0.0, (prompt, own, theirs)


def test_a_malformed_frame_gets_an_error_and_the_session_goes_on(server):
    """Bytes that are no image, a GIF, bad JSON, unknown or invalid fields: each an error message; then a change
    is acknowledged and frames are drawn, indexed from 0 (what was refused took no index)."""
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with Client(server) as client:
        for data, expected in [(b"this is not an image", "not a readable JPEG or PNG"),
                               (gif.getvalue(), "must be JPEG or PNG, not GIF")]:  # fmt: skip
            client.ws.send(data)
            error = json.loads(client.ws.recv(timeout=60))
            assert error["type"] == "error" and expected in error["message"], error
        assert client.message(strength=2)["message"] == "strength 2 must be in (0, 1]"
        client.ws.send("{not json")
        assert "malformed message" in json.loads(client.ws.recv(timeout=60))["message"]
        assert "unknown field(s) colour" in client.message(colour="red")["message"]
        assert client.message(strength=0.5) == {"type": "params", "prompt": RED_CIRCLE, "steps": [1, 3],
                                                "guidance_scale": 8.5, "delta": 1.0}  # fmt: skip
        got = client.stream(frames(2, seed=3))
    assert [(m["index"], m["status"]) for m, _ in got] == [(0, "done"), (1, "done")]


def test_the_session_cap_is_enforced(server):
    """max_sessions=2: a third connection is accepted and closed at once with 1013 and a reason; once one session
    ends, a new one is served."""
    with Client(server) as first, Client(server):
        assert first.ready["type"] == "ready"
        with connect(socket_url(server), open_timeout=30) as third, pytest.raises(ConnectionClosed) as closed:
            third.recv(timeout=30)
        assert closed.value.rcvd.code == SESSIONS_FULL
        assert closed.value.rcvd.reason == "stream sessions full (2 of 2 in use); try again later"
    for attempt in range(40):  # a seat is given back once the server has seen its client close
        try:
            with Client(server) as fourth:
                assert fourth.ready["type"] == "ready"
            break
        except ConnectionClosed as e:
            assert e.rcvd.code == SESSIONS_FULL and attempt < 39, e
            time.sleep(0.05)


def test_a_burst_of_frames_gets_one_report_each_in_order(server):
    """Frames sent faster than they are drawn: the oldest waiting ones beyond max_queued are dropped, and every frame
    still gets exactly one report, in order (dropped or drawn)."""
    with Client(server) as client:
        for pixels in frames(8, seed=4):
            client.send_frame(pixels)
        client.ws.send(json.dumps({"flush": True}))
        got = client.reports(8)
    assert [m["index"] for m, _ in got] == list(range(8))
    assert {m["status"] for m, _ in got} <= {"done", "dropped"} and got[-1][0]["status"] == "done"


def test_a_txt2img_session_generates_on_request(server):
    with Client(server, mode="txt2img") as client:
        assert client.ready["mode"] == "txt2img"
        client.ws.send(json.dumps({"generate": 3, "flush": False}))
        client.ws.send(json.dumps({"flush": True}))
        got = client.reports(3)
    assert [(m["index"], m["status"]) for m, _ in got] == [(0, "done"), (1, "done"), (2, "done")]
    assert not np.array_equal(got[0][1], got[1][1])  # each image its own start noise


def test_bad_connection_options_are_refused_with_the_reason(server):
    with connect(socket_url(server, guidance="full")) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1008 and "unknown option 'guidance'" in closed.value.rcvd.reason


def test_the_page_is_served(server):
    with urllib.request.urlopen(server + "/stream", timeout=30) as reply:
        html = reply.read().decode()
    assert reply.headers["content-type"].startswith("text/html")
    assert "getUserMedia" in html and "drawPattern" in html and "window.streamStats" in html
