"""The HTTP server: `create_app(service)` is a FastAPI app over one served model (diffrt.serve.service).

Routes: POST /v1/images/generations and /v1/images/edits (OpenAI's Images API), GET /v1/models, GET /health,
/ready and /metrics, GET / (the web page) and GET /images/{id} (url responses). The layer is thin: it parses into
diffrt's request type (generation.py) and knows nothing of models. Other routes (the real-time stream, say) are
mounted with `routers=`; they reach the same model through `get_service` and its worker, and the same key check
through `require_api_key`.
"""

import hmac
import io
import json
import os
import time
from collections.abc import Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from diffrt.serve.generation import ApiError, respond
from diffrt.serve.openai_api import ImageEditRequest, ImageGenerationRequest
from diffrt.serve.service import ModelService

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/models", "/health", "/ready", "/metrics", "/")
MAX_UPLOAD_BYTES = 25 * 2**20  # per image file, OpenAI's own limit for edits
MAX_UPLOAD_PIXELS = 8192 * 8192  # refused before decoding: a small file can hold a huge image
MAX_IMAGES = 16


def get_service(request: Request) -> ModelService:
    return request.app.state.service


def require_api_key(request: Request) -> None:
    """With an API key configured, every /v1 request must carry `Authorization: Bearer KEY` (else 401)."""
    key = get_service(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", type="authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def field_errors(errors: Sequence[dict]) -> str:
    """Pydantic's errors as one message naming each field: "steps: Input should be a valid integer; ..."."""
    parts = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(parts)


class MetricsAndReplica:
    """Pure ASGI middleware (streams pass through untouched): counts requests by endpoint and status, times them,
    and names the replica that answered in `X-Diffrt-Replica`."""

    def __init__(self, app, service: ModelService, replica_id: str) -> None:
        self.app, self.service, self.replica = app, service, replica_id.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/images" if path.startswith("/images/") else "other"
        status, start = 500, time.perf_counter()

        async def send_with_replica(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-diffrt-replica", self.replica)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        except BaseException:
            status = 499 if status == 500 else status  # cancelled (its client went away) before it answered
            raise
        finally:
            metrics = self.service.metrics
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def create_app(service: ModelService, *, routers: Sequence[APIRouter] = (), replica_id: str | None = None) -> FastAPI:
    """The server's app over `service` (started by the caller); `routers` are included as they are."""
    app = FastAPI(title="diffrt", summary="diffusion image generation, OpenAI Images API compatible")
    app.state.service = service
    app.add_middleware(
        MetricsAndReplica, service=service, replica_id=replica_id or f"{os.uname().nodename}:{os.getpid()}"
    )
    auth = [Depends(require_api_key)]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            detail = "; ".join(str(err.get("ctx", {}).get("error", err.get("msg"))) for err in errors)
            return ApiError(400, f"the request body is not valid JSON: {detail}").response()
        return ApiError(422, field_errors(errors), param=_first_field(errors)).response()

    @app.post("/v1/images/generations", dependencies=auth, openapi_extra=json_body(ImageGenerationRequest))
    async def generations(request: Request):
        return await respond(service, await read_json(request, ImageGenerationRequest), request)

    @app.post("/v1/images/edits", dependencies=auth)
    async def edits(request: Request):
        body, images = await read_edit_form(request)
        return await respond(service, body, request, images)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0, "owned_by": "diffrt"}]}

    @app.get("/health")
    async def health():
        status = 200 if service.healthy else 503
        return JSONResponse({"status": "ok" if status == 200 else "unhealthy", **service.describe()}, status)

    @app.get("/ready")
    async def ready():
        if service.ready:
            return {"ready": True}
        error = service.worker.warmup_error
        return JSONResponse({"ready": False, "reason": f"warm-up failed: {error}" if error else "warming up"}, 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    @app.get("/images/{filename}")
    async def image(filename: str):
        found = await service.store.get(filename.split(".")[0])
        if found is None:
            raise ApiError(404, "no such image: it expired or was never made (url images are kept "
                           f"{service.config.image_ttl_s:g} s)", type="not_found")  # fmt: skip
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, max-age=600"})

    for router in (*routers, *_stream_routers(service)):
        app.include_router(router)
    return app


def _stream_routers(service: ModelService) -> list[APIRouter]:
    """The real-time stream at /stream over the served model, square at its default size (a connection's query
    options set its prompt, strength, guidance and mode; diffrt.stream.session)."""
    sessions = service.config.stream_sessions
    if sessions == 0 or service.config.api_key:
        return []
    from diffrt.stream import StreamConfig
    from diffrt.stream.routes import stream_router
    from diffrt.stream.session import stream_factory

    size = service.pipeline.spec.default_size
    defaults = StreamConfig(prompt="", height=size, width=size)
    return [stream_router(stream_factory(service.pipeline, defaults), max_sessions=sessions)]


def _first_field(errors: Sequence[dict]) -> str | None:
    loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"] if errors else []
    return ".".join(loc) or None


def json_body(model) -> dict:
    """The OpenAPI description of a JSON body read by hand (read_json)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def read_json(request: Request, model):
    """The body as `model`, whatever Content-Type says (curl -d sends a form type): 400 if it is not JSON at
    all, 422 naming each field whose type is wrong."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, field_errors(e.errors()), param=_first_field(e.errors())) from None


async def read_edit_form(request: Request) -> tuple[ImageEditRequest, list[Image.Image]]:
    """The multipart form of /v1/images/edits: `image` or `image[]` file(s) and the request's fields as text."""
    try:
        form = await request.form(max_files=MAX_IMAGES, max_fields=64)
    except Exception as e:  # not multipart, or over the form's limits
        raise ApiError(400, f"/v1/images/edits takes a multipart/form-data body with an image file: {e}") from None
    fields, files = {}, []
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            if isinstance(value, str):
                raise ApiError(400, f"{key} must be an uploaded file, not a text field", param=key)
            files.append((key, value))
        elif key == "mask":
            raise ApiError(400, "mask (inpainting) is not supported: the whole image is edited, by `strength`",
                           param="mask")  # fmt: skip
        elif key in fields:
            raise ApiError(400, f"{key} was given twice", param=key)
        elif not isinstance(value, str):
            raise ApiError(400, f"{key} must be a text field, not a file", param=key)
        else:
            fields[key] = value
    if not files:
        raise ApiError(400, "image: an edit needs an image file (field 'image' or 'image[]')", param="image")
    try:
        body = ImageEditRequest.model_validate_strings(fields)
    except ValidationError as e:
        raise ApiError(422, field_errors(e.errors()), param=_first_field(e.errors())) from None
    images = [await run_in_threadpool(_open_image, key, await upload.read()) for key, upload in files]
    return body, images


def _open_image(key: str, data: bytes) -> Image.Image:
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(400, f"{key}: the file is {len(data) / 2**20:.1f} MiB; at most {MAX_UPLOAD_BYTES // 2**20} MiB",
                       param=key)  # fmt: skip
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise ApiError(400, f"{key}: {image.width}x{image.height} is too large to read (at most "
                           f"{MAX_UPLOAD_PIXELS} pixels)", param=key)  # fmt: skip
        return image.convert("RGB")
    except UnidentifiedImageError:
        raise ApiError(400, f"{key}: the file is not an image (no format PIL reads: png, jpeg, webp, ...)",
                       param=key) from None  # fmt: skip
    except (OSError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{key}: the image file cannot be read ({e})", param=key) from None
