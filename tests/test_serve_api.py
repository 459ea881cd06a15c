"""`diffrt serve` as a real process on a loopback port, spoken to by the official `openai` client and plain HTTP:
the pictures it returns are the prompts (the adherence judge reads them), url and b64_json both work, every bad
input gets its status and a message naming the field, and the server stays healthy through all of it."""

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from tests.helpers.serve_process import judge_reads, picture, server_process

openai = pytest.importorskip("openai", reason="the serve tests need the test extra (openai)")
KEY = "test-key-123"
PROMPT = "a red star above a blue circle, yellow background"  # a held-out pair: composition, not memory
EDIT_PROMPT = "a green square above a yellow star, black background"


@pytest.fixture(scope="module")
def server():
    with server_process(["--api-key", KEY, "--max-queue", "4"]) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_openai_client_generates_the_prompt_as_png(client):
    result = client.images.generate(model="diffrt-default", prompt=PROMPT, size="64x64", response_format="b64_json",
                                    extra_body={"steps": 4, "seed": 1})  # fmt: skip
    assert len(result.data) == 1 and result.size == "64x64" and result.output_format == "png"
    data = base64.b64decode(result.data[0].b64_json)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = picture(data)
    assert pixels.shape == (64, 64, 3)
    assert judge_reads(pixels, PROMPT)["all"] == 1.0, "the judge does not read the prompt in the server's picture"
    again = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"steps": 4, "seed": 1})
    assert again.data[0].b64_json == result.data[0].b64_json, "the same seed gave another picture"


def test_url_responses_serve_the_picture(client, server):
    result = client.images.generate(prompt=PROMPT, size="64x64", response_format="url", n=2,
                                    extra_body={"steps": 4, "seed": 1, "output_format": "webp"})  # fmt: skip
    assert len(result.data) == 2
    for item in result.data:
        assert item.url.startswith(f"{server}/images/") and item.url.endswith(".webp")
        fetched = httpx.get(item.url, timeout=10)  # no key: the URL is the capability, as OpenAI's are
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
        assert judge_reads(picture(fetched.content), PROMPT)["all"] == 1.0
    assert httpx.get(f"{server}/images/nonexistent.png", timeout=10).status_code == 404


def test_openai_client_edits_an_image(client):
    init = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(init, format="PNG")
    init.seek(0)
    result = client.images.edit(image=("init.png", init, "image/png"), prompt=EDIT_PROMPT, size="64x64",
                                extra_body={"strength": 0.75, "steps": 4, "seed": 2},
                                response_format="b64_json")  # fmt: skip
    assert judge_reads(picture(base64.b64decode(result.data[0].b64_json)), EDIT_PROMPT)["all"] == 1.0


def test_several_edit_images_give_n_outputs_each(server):
    files = []
    for color in ((255, 0, 0), (0, 0, 255)):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buffer, format="JPEG")
        files.append(("image[]", (f"{color}.jpg", buffer.getvalue(), "image/jpeg")))
    r = httpx.post(f"{server}/v1/images/edits", headers=auth(), files=files, timeout=60,
                   data={"prompt": EDIT_PROMPT, "n": "2", "strength": "0.75", "steps": "4", "seed": "3",
                         "output_format": "jpeg"})  # fmt: skip
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 4 and all(base64.b64decode(d["b64_json"])[:2] == b"\xff\xd8" for d in data)


def test_api_key_is_required(server):
    body = {"prompt": PROMPT}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server}/v1/images/generations", json=body, headers=headers, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "API key" in r.json()["error"]["message"]
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt=PROMPT)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200  # probes need no key


def png_upload(data: bytes = b"", name: str = "x.png"):
    return [("image", (name, data, "image/png"))]


def a_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = {"prompt": PROMPT, "size": "64x64", "steps": 4}
# (request, status, words the message must contain): JSON bodies for generations, ("edit", fields, files) for edits
BAD = [
    ("{not json", 400, ["not valid JSON"]),
    ('["a list"]', 422, ["valid dictionary"]),
    ({"size": "64x64"}, 422, ["prompt", "Field required"]),
    ({**GOOD, "prompt": 7}, 422, ["prompt", "valid string"]),
    ({**GOOD, "steps": "four"}, 422, ["steps", "valid integer"]),
    ({**GOOD, "steps": True}, 422, ["steps", "valid integer"]),
    ({**GOOD, "n": 1.5}, 422, ["n", "valid integer"]),
    ({**GOOD, "guidance_scale": "high"}, 422, ["guidance_scale"]),
    ({**GOOD, "quality": "hd"}, 422, ["quality", "Extra inputs are not permitted"]),
    ({**GOOD, "response_format": "gif"}, 422, ["response_format", "'b64_json' or 'url'"]),
    ({**GOOD, "output_format": "bmp"}, 422, ["output_format"]),
    ({**GOOD, "size": "big"}, 400, ["size 'big'", "WIDTHxHEIGHT"]),
    ({**GOOD, "size": "4096x4096"}, 400, ["width 4096", "limit of 256"]),
    ({**GOOD, "size": "100x64"}, 400, ["width 100 is not a multiple of 8", "96 or 104"]),
    ({**GOOD, "steps": 1000}, 400, ["steps 1000", "limit of 100"]),
    ({**GOOD, "steps": 0}, 400, ["steps 0", ">= 1"]),
    ({**GOOD, "n": 11}, 400, ["n 11", "1..10"]),
    ({**GOOD, "n": 0}, 400, ["n 0", "1..10"]),
    ({**GOOD, "sampler": "plms"}, 400, ["unknown sampler 'plms'", "euler_a"]),
    ('{"prompt": "x", "guidance_scale": NaN}', 400, ["guidance scale nan", "finite"]),
    ({**GOOD, "guidance_scale": -1}, 400, ["guidance scale -1", ">= 0"]),
    ({**GOOD, "eta": 0.5}, 400, ["eta applies to the ddim and tcd samplers only"]),
    ({**GOOD, "seed": -1}, 400, ["seed -1"]),
    ({**GOOD, "model": "dall-e-3"}, 400, ["model 'dall-e-3' is not served here", "diffrt-default"]),
    ({**GOOD, "prompt": "x" * 5000}, 400, ["prompt is 5000 characters"]),
    (("edit", {"prompt": "x"}, png_upload(b"this is not an image")), 400, ["image: the file is not an image"]),
    (("edit", {"prompt": "x"}, []), 400, ["image", "needs an image file"]),
    (("edit", {"prompt": "x", "steps": "abc"}, "png"), 422, ["steps", "valid integer"]),
    (("edit", {"prompt": "x", "strength": "2"}, "png"), 400, ["strength 2", "(0, 1]"]),
    (("edit", {"prompt": "x", "mask": "m"}, "png"), 400, ["mask", "not supported"]),
    (("edit", {"prompt": "x", "n": "1", "unknown": "1"}, "png"), 422, ["unknown", "Extra inputs"]),
]


def send(server: str, request) -> httpx.Response:
    url = f"{server}/v1/images"
    if isinstance(request, tuple):
        _, fields, files = request
        files = png_upload(a_png()) if files == "png" else files
        if not files:  # multipart with text fields only
            files = [("prompt", (None, fields.pop("prompt")))]
        return httpx.post(f"{url}/edits", data=fields, files=files, headers=auth(), timeout=30)
    content = request if isinstance(request, str) else json.dumps(request)
    return httpx.post(f"{url}/generations", content=content, headers={**auth(), "Content-Type": "application/json"},
                      timeout=30)  # fmt: skip


@pytest.mark.parametrize("request_,status,words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_a_message_naming_the_field(server, request_, status, words):
    r = send(server, request_)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_the_server_is_healthy_after_bad_input(server, client):
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["queue"]["depth"] == 0
    result = client.images.generate(prompt=PROMPT, size="64x64", extra_body={"steps": 4, "seed": 1})
    assert judge_reads(picture(base64.b64decode(result.data[0].b64_json)), PROMPT)["all"] == 1.0
    metrics = httpx.get(f"{server}/metrics", timeout=10).text
    assert 'diffrt_requests_total{endpoint="/v1/images/generations",status="422"}' in metrics
    assert 'diffrt_requests_total{endpoint="/v1/images/generations",status="400"}' in metrics
    assert "diffrt_request_seconds_bucket" in metrics and "diffrt_queue_depth 0.0" in metrics


def test_progress_as_server_sent_events(server):
    events = []
    with httpx.stream("POST", f"{server}/v1/images/generations", headers=auth(), timeout=60,
                      json={**GOOD, "seed": 1, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    progress = [d["step"] for n, d in events if n == "progress"]
    assert progress == [1, 2, 3, 4], events
    (name, done), *_ = [e for e in events if e[0] == "image_generation.completed"]
    assert done["size"] == "64x64" and judge_reads(picture(base64.b64decode(done["b64_json"])), PROMPT)["all"] == 1.0


def test_health_ready_models(server):
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["model"] == "diffrt-default" and health["limits"]["max_side"] == 256 and health["auth"] is True
    assert httpx.get(f"{server}/ready", timeout=10).json() == {"ready": True}
    models = httpx.get(f"{server}/v1/models", headers=auth(), timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["diffrt-default"]
