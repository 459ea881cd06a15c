"""One connection's stream session, apart from the web framework: encoded frames and JSON messages in, JSON reports
and JPEG pictures out. A malformed frame or message gets an error message; the session goes on.

Client -> server: an encoded image (JPEG or PNG bytes) is a frame; a text message is a JSON object of changes
({"prompt": ..., "negative_prompt": ..., "strength": ..., "steps": [...], "guidance_scale": ..., "delta": ...}),
{"flush": true} (the in-flight frames' pictures now) or, in a txt2img session, {"generate": N}.
Server -> client: {"type": "frame", "index", "status" ("done" | "skipped" | "dropped"), "repeat_of", "latency_ms",
"bytes"} per frame, in frame order, each but a dropped one followed by its picture as JPEG bytes;
{"type": "params", ...} after a change, {"type": "error", "message"} for what could not be used.
A connection's query options (QUERY_OPTIONS: prompt, negative_prompt, strength, guidance_scale,
similarity_threshold, seed, mode) set its stream's preparation over the server's defaults.
"""

import io
import json
from collections.abc import Callable
from dataclasses import replace

from PIL import Image, UnidentifiedImageError

from diffrt.stream.config import StreamConfig, steps_for_strength
from diffrt.stream.ordering import DROPPED, StreamFrame
from diffrt.stream.stream import Stream

Message = dict | bytes
FRAME_FORMATS = ("JPEG", "PNG")
MAX_FRAME_PIXELS = 4096 * 4096  # a frame is resized to the stream's size; a larger one is refused, not decoded
UPDATABLE = ("prompt", "negative_prompt", "strength", "steps", "guidance_scale", "delta")
# Connection options a client may set (query parameters), with the type each is read as.
QUERY_OPTIONS = {"prompt": str, "negative_prompt": str, "strength": float, "guidance_scale": float,
                 "similarity_threshold": float, "seed": int, "mode": str}  # fmt: skip


class StreamSession:
    def __init__(self, stream: Stream, jpeg_quality: int = 85) -> None:
        self.stream, self.jpeg_quality = stream, jpeg_quality

    def hello(self) -> dict:
        c = self.stream.config
        return {"type": "ready", "width": c.width, "height": c.height, "mode": c.mode, "steps": list(c.steps),
                "delay_frames": c.delay, "guidance": c.guidance, "prompt": c.prompt}  # fmt: skip

    def frame(self, data: bytes) -> list[Message]:
        """An encoded frame: its decoded pixels through the stream; the reports that are complete now."""
        try:
            image = decode_frame(data)
        except ValueError as e:
            return [error(str(e))]
        return self.reports(self.stream(image))

    def message(self, text: str) -> list[Message]:
        """A JSON control message."""
        try:
            changes = json.loads(text)
            if not isinstance(changes, dict):
                raise ValueError("a control message is a JSON object")
        except ValueError as e:
            return [error(f"malformed message: {e}")]
        out: list[Message] = []
        try:
            if changes.pop("flush", False):
                out += self.reports(self.stream.flush())
            count = changes.pop("generate", 0)
            unknown = sorted(set(changes) - set(UPDATABLE))
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}; a message may set {', '.join(UPDATABLE)}, "
                                 "flush or generate")  # fmt: skip
            if changes:
                if "steps" in changes:
                    changes["steps"] = tuple(changes["steps"])
                config = self.stream.update(**changes)
                out.append({"type": "params", "prompt": config.prompt, "steps": list(config.steps),
                            "guidance_scale": self.stream.guidance_scale, "delta": config.delta})  # fmt: skip
            if not isinstance(count, int) or not 0 <= count <= 64:
                raise ValueError(f"generate {count!r} must be an integer in [0, 64]")
            for _ in range(count):
                out += self.reports(self.stream.txt2img())
        except (TypeError, ValueError) as e:
            out.append(error(str(e)))
        return out

    def drop(self) -> list[Message]:
        """A frame the server discarded unseen because frames arrived faster than the stream ran."""
        return self.reports(self.stream.drop())

    def reports(self, frames: list[StreamFrame]) -> list[Message]:
        out: list[Message] = []
        for f in frames:
            picture = b"" if f.status == DROPPED else encode_jpeg(f.picture, self.jpeg_quality)
            latency = None if f.latency_ms is None else round(f.latency_ms, 2)
            out.append({"type": "frame", "index": f.index, "status": f.status, "repeat_of": f.repeat_of,
                        "latency_ms": latency, "bytes": len(picture)})  # fmt: skip
            if picture:
                out.append(picture)
        return out


def decode_frame(data: bytes) -> Image.Image:
    """JPEG or PNG bytes -> an RGB image; ValueError saying what is wrong otherwise."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FRAME_FORMATS:
            raise ValueError(f"a frame must be JPEG or PNG, not {image.format}")
        if image.width * image.height > MAX_FRAME_PIXELS:
            raise ValueError(f"a {image.width}x{image.height} frame is larger than {MAX_FRAME_PIXELS} pixels")
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"the frame ({len(data)} bytes) is not a readable JPEG or PNG image: {e}") from e


def encode_jpeg(picture, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def error(message: str) -> dict:
    return {"type": "error", "message": message}


def stream_factory(pipe, defaults: StreamConfig, **stream_options) -> Callable[[dict], Stream]:
    """A factory of one Stream per session: `defaults` with the connection's query options (QUERY_OPTIONS; a
    strength maps to as many steps as the defaults have) over them. stream_options go to Stream (vae=...)."""

    def make(query: dict) -> Stream:
        options = {}
        for name, value in query.items():
            if name not in QUERY_OPTIONS:
                raise ValueError(f"unknown option {name!r}; a session may set {', '.join(QUERY_OPTIONS)}")
            try:
                options[name] = QUERY_OPTIONS[name](value)
            except ValueError as e:
                raise ValueError(f"option {name}={value!r}: {e}") from e
        strength = options.pop("strength", None)
        if strength is not None:
            options["steps"] = steps_for_strength(strength, len(defaults.steps), defaults.num_inference_steps)
        return Stream(pipe, replace(defaults, **options), **stream_options)

    return make
