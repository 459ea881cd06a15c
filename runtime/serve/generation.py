"""One image request's way through the server: checks, the worker, then the images as JSON or server-sent events.

1. check (host, before any work): the served model's name, the size, this server's limits, then
   diffrt.request.resolve_request (every value check and the memory estimate); a problem is a 400
2. queue it on the model's worker (a full queue is a 429 with Retry-After)
3. wait for it, watching the client: a disconnect cancels it (the worker stops at the next step)
4. encode the images (png/jpeg/webp) off the event loop; answer with base64 or a URL
"""

import asyncio
import base64
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from diffrt.serve.openai_api import (
    OUTPUT_FORMATS,
    ImageGenerationRequest,
    encode_image,
    error_body,
    images_response,
    parse_size,
    to_generation_request,
)
from diffrt.serve.service import ModelService
from diffrt.serve.worker import Cancelled, Job, OutOfMemory, QueueFull, TimedOut

POLL_S = 0.25  # how often a waiting request looks whether its client is still there
KEEPALIVE_S = 1.0  # an event stream writes at least this often, so that a gone client is noticed
HARD_GRACE_S = 5.0  # past its deadline, a request is answered even if the worker is stuck inside one step


class ApiError(Exception):
    """An error response: status, message (OpenAI's error shape), the field it is about, extra headers."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = error_body(self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def check(service: ModelService, body: ImageGenerationRequest, images=None):
    """1. The resolved diffrt request, or ApiError 400 naming each problem."""
    if body.model is not None and body.model != service.name:
        raise ApiError(400, f"model {body.model!r} is not served here; this server serves {service.name!r}",
                       param="model", code="model_not_found")  # fmt: skip
    try:
        width, height = parse_size(body.size)
    except ValueError as e:
        raise ApiError(400, str(e), param="size") from None
    problems = service.limits.problems(n=body.n, width=width, height=height, steps=body.steps, prompt=body.prompt)
    if problems:
        raise ApiError(400, "; ".join(problems), param=problems[0].split(" ")[0].rstrip(":"))
    try:
        return service.resolve(to_generation_request(body, images))
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def submit(service: ModelService, request, on_progress=None) -> Job:
    """2. Queued on the worker, or ApiError 429 with Retry-After."""
    try:
        return service.worker.submit_request(request, timeout_s=service.config.timeout_s, on_progress=on_progress)
    except QueueFull as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(e.retry_after_s)}) from None  # fmt: skip


def job_error(e: BaseException) -> ApiError:
    """The error response of a job that did not give images."""
    if isinstance(e, Cancelled):
        return ApiError(499, str(e), type="cancelled")  # nginx's "client closed request": nobody reads it
    if isinstance(e, TimedOut):
        return ApiError(504, f"{e}; ask for fewer steps or a smaller size", type="timeout", code="timeout")
    if isinstance(e, OutOfMemory):
        return ApiError(503, f"{e}; ask for a smaller size or fewer images", type="server_error",
                        code="out_of_memory")  # fmt: skip
    if isinstance(e, ValueError):  # a check only the run itself could make
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


async def wait(job: Job, http: Request):
    """3. The job's result; cancels it when the client disconnects (or this task is cancelled, as Ray Serve does
    when its client goes), and gives up HARD_GRACE_S past its deadline."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=POLL_S)
            if done:
                return future.result()
            if await http.is_disconnected():
                job.cancel()
                raise Cancelled("the client disconnected")
            if time.monotonic() > job.deadline + HARD_GRACE_S:
                job.cancel()
                raise TimedOut(f"timed out after {job.timeout_s:g} s ({job.where()})")
    except asyncio.CancelledError:
        job.cancel()
        raise


async def encode(service: ModelService, body: ImageGenerationRequest, http: Request, result) -> tuple[list, list]:
    """4. (file bytes, urls or None) of the result's images, encoded off the event loop."""
    files = await run_in_threadpool(
        lambda: [encode_image(im, body.output_format, body.output_compression) for im in result.images]
    )
    service.metrics.images.inc(len(files))
    if body.response_format != "url":
        return files, None
    media_type, base = OUTPUT_FORMATS[body.output_format], str(http.base_url).rstrip("/")
    try:
        ids = [await service.store.put(f, media_type) for f in files]
    except ValueError as e:
        raise ApiError(400, str(e), param="response_format") from None
    return files, [f"{base}/images/{i}.{body.output_format}" for i in ids]


def observe(service: ModelService, job: Job) -> None:
    if job.started is not None:
        service.metrics.queue_wait.observe(job.started - job.submitted)
        service.metrics.generation.observe(time.monotonic() - job.started)


async def respond(service: ModelService, body: ImageGenerationRequest, http: Request, images=None):
    """The whole way, as one JSON response (or an event stream when body.stream)."""
    request = check(service, body, images)
    if body.stream:
        return stream(service, body, http, request)
    job = submit(service, request)
    try:
        result = await wait(job, http)
    except Exception as e:  # the job's own failure (Cancelled, TimedOut, OutOfMemory, ...) as its response
        raise job_error(e) from None
    finally:
        observe(service, job)
    files, urls = await encode(service, body, http, result)
    size = f"{result.images[0].width}x{result.images[0].height}"
    return JSONResponse(images_response(files, body, size, result.seed, urls))


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def stream(service: ModelService, body: ImageGenerationRequest, http: Request, request) -> StreamingResponse:
    """Server-sent events for one request: `progress` {step, steps} after each step, then one
    `image_generation.completed` {index, b64_json | url, output_format, size, seed} per image (OpenAI's streaming
    event name), or one `error` {status, error}. A client that goes away cancels the work."""
    loop = asyncio.get_running_loop()
    progress: asyncio.Queue = asyncio.Queue()

    def on_progress(done: int, total: int) -> None:  # on the worker thread
        loop.call_soon_threadsafe(progress.put_nowait, {"step": done, "steps": total})

    job = submit(service, request, on_progress)  # before the response starts: a full queue is still a real 429

    async def events():
        future = asyncio.wrap_future(job.future)
        try:
            yield event("queued", {"queue_depth": service.worker.depth, "steps": job.steps})
            while not future.done():
                getter = asyncio.ensure_future(progress.get())
                done, _ = await asyncio.wait({future, getter}, timeout=KEEPALIVE_S,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if getter in done:
                    yield event("progress", getter.result())
                else:
                    getter.cancel()
                    yield ": keep-alive\n\n"
                if await http.is_disconnected():
                    return
            observe(service, job)
            try:
                result = future.result()
                files, urls = await encode(service, body, http, result)
            except ApiError as e:
                yield event("error", {"status": e.status, **error_body(e.message, type=e.type, param=e.param)})
                return
            except Exception as e:
                error = job_error(e)
                yield event("error", {"status": error.status, **error_body(error.message, type=error.type,
                                                                            code=error.code)})  # fmt: skip
                return
            size = f"{result.images[0].width}x{result.images[0].height}"
            for i, f in enumerate(files):
                image = {"url": urls[i]} if urls else {"b64_json": base64.b64encode(f).decode("ascii")}
                yield event("image_generation.completed", {"index": i, **image, "output_format": body.output_format,
                                                           "size": size, "seed": result.seed})  # fmt: skip
        finally:
            job.cancel()  # a no-op once done; stops the work when the client went away mid-stream

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
