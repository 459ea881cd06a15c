"""The OpenAI Images API's request and response, and their mapping onto diffrt's one request type.

Field names and defaults follow OpenAI's `POST /v1/images/generations` and `/v1/images/edits`; diffrt's own fields
(negative_prompt, steps, sampler, guidance_scale, seed, eta, strength) sit at the top level, where the official
client's `extra_body` puts them. Types are checked here (422, naming the field); values are checked once, by
diffrt.request.resolve_request, as for the CLI (400 with its message). Unknown fields are refused by name rather
than silently ignored.
"""

import base64
import io
import re
import time
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from diffrt.request import GenerationRequest

OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
Number = StrictFloat | StrictInt  # a JSON number; a string or a boolean is refused by name


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations (JSON)."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None  # "WxH" or "auto" (the model's default; an edit: the image's size)
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: StrictInt | None = Field(None, ge=0, le=100)  # jpeg/webp quality
    user: StrictStr | None = None  # accepted for compatibility; not used
    stream: StrictBool = False  # server-sent events: progress per step, then the images
    # diffrt's own (extra_body); None: the model's default, as in GenerationRequest
    negative_prompt: StrictStr | None = None
    steps: StrictInt | None = None
    sampler: StrictStr | None = None
    guidance_scale: Number | None = None
    seed: StrictInt | None = None
    eta: Number | None = None


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits (multipart form; the image file(s) come beside these fields)."""

    strength: Number = 0.8


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(width, height) of "WxH"; (None, None) for None or "auto". ValueError naming the field."""
    if size is None or size == "auto":
        return None, None
    match = SIZE.match(size)
    if not match:
        raise ValueError(f"size {size!r} must be WIDTHxHEIGHT in pixels, e.g. '512x512', or 'auto'")
    return int(match[1]), int(match[2])


def to_generation_request(body: ImageGenerationRequest, images: list[Image.Image] | None = None) -> GenerationRequest:
    """The diffrt request of an OpenAI one. images (edits): each is the start of `n` outputs, all at one size."""
    width, height = parse_size(body.size)
    fields = dict(
        negative_prompt=body.negative_prompt, width=width, height=height, steps=body.steps, sampler=body.sampler,
        guidance_scale=body.guidance_scale, seed=body.seed, eta=body.eta, batch=body.n,
    )  # fmt: skip
    if not images:
        return GenerationRequest(prompt=body.prompt, **fields)
    if len(images) == 1:
        return GenerationRequest(prompt=body.prompt, image=images[0], strength=body.strength, **fields)
    # Several images: one prompt per image, `n` outputs each, as one batch [k * n, 3, H, W] in the prompts' order.
    import numpy as np
    import torch

    size = (width, height) if width and height else images[0].size
    stack = np.stack([np.asarray(im.convert("RGB").resize(size, Image.LANCZOS)) for im in images])
    tensor = torch.from_numpy(stack).permute(0, 3, 1, 2).float().div(255).repeat_interleave(body.n, dim=0)
    negative = None if body.negative_prompt is None else [body.negative_prompt] * len(images)
    fields.update(negative_prompt=negative, width=size[0], height=size[1])
    return GenerationRequest(prompt=[body.prompt] * len(images), image=tensor, strength=body.strength, **fields)


def encode_image(image: Image.Image, output_format: str, compression: int | None) -> bytes:
    """The image file bytes in `output_format` (jpeg/webp at quality `compression`, default 90)."""
    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": 90 if compression is None else compression}
    image.save(buffer, format=output_format.upper(), **options)
    return buffer.getvalue()


def images_response(files: list[bytes], body: ImageGenerationRequest, size: str, seed: int | None,
                    urls: list[str] | None = None) -> dict:  # fmt: skip
    """OpenAI's ImagesResponse: created, data[{b64_json} | {url}], output_format, size; and diffrt's seed."""
    if urls is not None:
        data = [{"url": url} for url in urls]
    else:
        data = [{"b64_json": base64.b64encode(f).decode("ascii")} for f in files]
    return {"created": int(time.time()), "data": data, "output_format": body.output_format, "size": size,
            "seed": seed}  # fmt: skip


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:  # fmt: skip
    """OpenAI's error shape, which the official client turns into its exceptions with this message."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
