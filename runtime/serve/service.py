"""One served model: its pipeline, the worker thread that runs it, its limits, its url store and its metrics.

This is what the HTTP layers talk to (app.py, ray_app.py, and routers mounted beside them, such as a stream): they
parse into diffrt's GenerationRequest, `resolve` it here (every check, before any work), and submit it to `worker`.
"""

import os
from dataclasses import dataclass, replace

import torch

from diffrt.request import GenerationRequest, resolve_request
from diffrt.serve.image_store import ImageStore
from diffrt.serve.limits import ServeLimits, derive_limits
from diffrt.serve.metrics import ServeMetrics
from diffrt.serve.worker import ModelWorker

EMBEDDED_MODEL_NAME = "diffrt-default"
WARMUP_PROMPT = "a red circle in the center, blue background"  # a caption of the embedded model's grammar


@dataclass(frozen=True)
class ServeConfig:
    """What `diffrt serve` was asked for; a plain record, so that Ray can ship it to each replica."""

    model: str | None = None  # a diffusers folder, single file or preset; None: the embedded default model
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # default: float16 on CUDA, float32 on CPU
    backend: str | None = None  # default: cuda-graph on a GPU, torch elsewhere
    max_queue: int = 16  # requests waiting for the worker before new ones get 429
    timeout_s: float = 300.0  # per request, queueing included
    max_size: int | None = None  # pixels per side; default: 4x the model's default size, lowered to what fits
    max_n: int = 10
    max_steps: int = 100
    memory_budget: int | None = None  # bytes for a generation's activations; default: measured at start
    api_key: str | None = None  # requests to /v1 need "Authorization: Bearer KEY"
    image_ttl_s: float = 600.0  # how long a url response's image is served
    image_store_bytes: int = 256 * 2**20
    warmup: bool = True  # one generation at the default size before /ready says yes (builds its CUDA graphs)
    # Real-time stream sessions at /stream (diffrt.stream.routes) at once; 0: no stream. Off with an api_key: a
    # browser's WebSocket cannot send the Authorization header.
    stream_sessions: int = 2


def model_name(model: str | None) -> str:
    return EMBEDDED_MODEL_NAME if model is None else os.path.basename(os.path.normpath(model))


class ModelService:
    def __init__(self, pipeline, config: ServeConfig, store=None) -> None:
        self.pipeline, self.config = pipeline, config
        self.name = model_name(config.model)
        self.metrics = ServeMetrics()
        self.limits: ServeLimits = derive_limits(
            pipeline.spec, pipeline.device, pipeline.dtype, max_side=config.max_size, max_n=config.max_n,
            max_steps=config.max_steps, memory_budget=config.memory_budget,
        )  # fmt: skip
        self.worker = ModelWorker(pipeline, max_queue=config.max_queue, metrics=self.metrics, name=self.name)
        self.store = store or ImageStore(config.image_store_bytes, config.image_ttl_s)

    @classmethod
    def load(cls, config: ServeConfig, store=None) -> "ModelService":
        """Load the model once (on the fast backend where there is a GPU)."""
        from diffrt.cli_generate import DEFAULT_MODEL
        from diffrt.pipeline import Pipeline

        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, config.dtype or ("float16" if device.type == "cuda" else "float32"))
        pipeline = Pipeline.from_pretrained(config.model or DEFAULT_MODEL, device=device, dtype=dtype,
                                            backend=config.backend)  # fmt: skip
        return cls(pipeline, config, store)

    def start(self) -> "ModelService":
        warmup = GenerationRequest(WARMUP_PROMPT, seed=0) if self.config.warmup else None
        self.worker.start(warmup)
        return self

    def stop(self) -> None:
        self.worker.stop()

    @property
    def ready(self) -> bool:
        return self.worker.ready.is_set() and self.worker.alive

    @property
    def healthy(self) -> bool:
        """The worker thread runs (or is still warming up without having failed)."""
        return self.worker.alive and self.worker.warmup_error is None

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults, checked against everything (the memory estimate against this
        server's budget); ValueError naming each problem. Memory is not checked again when it runs."""
        pipe = self.pipeline
        resolved = resolve_request(request, pipe.spec, device=pipe.device, dtype=pipe.dtype, weights_resident=True,
                                   memory_budget=self.limits.memory_budget)  # fmt: skip
        return replace(resolved, check_memory=False)

    def describe(self) -> dict:
        """What /health reports: the model, its limits, the samplers, the queue."""
        from diffrt.sampler_registry import SAMPLERS

        return {
            "model": self.name,
            "device": str(self.pipeline.device),
            "backend": self.pipeline.backend.name,
            "default_size": self.pipeline.spec.default_size,
            "default_sampler": self.pipeline.default_sampler(),
            "samplers": list(SAMPLERS),
            "limits": self.limits.as_dict(),
            "queue": {"depth": self.worker.depth, "max": self.worker.max_queue},
            "auth": self.config.api_key is not None,
        }
