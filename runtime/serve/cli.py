"""`diffrt serve`: the HTTP server on uvicorn, or with --ray its replicas on a local Ray Serve instance.

The model is loaded (and warmed up) before the port is opened to requests that generate: /health answers at once,
/ready once the warm-up ran. The default bind is loopback; --api-key (or DIFFRT_API_KEY) guards /v1.
"""

import argparse
import importlib.util
import os
import sys

from diffrt.backends import BACKENDS
from diffrt.cli_generate import DTYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (OpenAI Images API, web page, metrics)")
    p.add_argument("--model", default=None, help="diffusers folder, single .safetensors file or preset "
                   "(default: the embedded model)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DIFFRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $DIFFRT_API_KEY, else none)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting per model before 429 (default 16)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queueing included")
    p.add_argument("--max-size", type=int, default=None, help="pixels per side (default: 4x the model's default "
                   "size, lowered to what the device's memory fits)")  # fmt: skip
    p.add_argument("--max-n", type=int, default=10, help="images per request (lowered to what fits)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--image-ttl", type=float, default=600.0, help="seconds a url response's image is served")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: cuda-graph on a GPU, else torch")
    p.add_argument("--no-warmup", action="store_true", help="ready at once, without one generation first")
    p.add_argument("--stream-sessions", type=int, default=2, help="real-time stream sessions at /stream at once "
                   "(0: none; off with --api-key, since a browser's WebSocket cannot send the key)")  # fmt: skip
    p.add_argument("--ray", action="store_true", help="run on a local Ray Serve instance (the `ray` extra)")
    p.add_argument("--replicas", type=int, default=None, help="--ray: replicas (default: one per GPU, else 1)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)


def config_of(args: argparse.Namespace):
    from diffrt.serve.service import ServeConfig

    for name in ("max_queue", "max_n", "max_steps", "port"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.stream_sessions < 0:
        raise ValueError(f"--stream-sessions {args.stream_sessions} must be >= 0")
    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout} must be > 0 seconds")
    return ServeConfig(
        model=args.model, device=args.device, dtype=args.dtype, backend=args.backend, max_queue=args.max_queue,
        timeout_s=args.timeout, max_size=args.max_size, max_n=args.max_n, max_steps=args.max_steps,
        api_key=args.api_key or None, image_ttl_s=args.image_ttl, warmup=not args.no_warmup,
        stream_sessions=0 if args.api_key else args.stream_sessions,
    )  # fmt: skip


def require(extra: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"diffrt serve needs the {extra!r} extra ({', '.join(missing)} missing): "
                         f"pip install 'diffrt[{extra}]'")  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    require("serve", "fastapi", "uvicorn", "prometheus_client", "multipart")
    config = config_of(args)
    if args.ray:
        require("ray", "ray")
        from diffrt.serve.ray_app import run_local

        return run_local(config, replicas=args.replicas, host=args.host, port=args.port)
    if args.replicas is not None:
        raise ValueError("--replicas applies with --ray only (one process serves one model on one device)")
    return serve_http(config, host=args.host, port=args.port, log_level=args.log_level)


def serve_http(config, *, host: str, port: int, log_level: str = "info", wrap=None) -> int:
    """Load, start the worker, serve until interrupted. wrap(pipeline) -> pipeline: tests' fault injection."""
    import uvicorn

    from diffrt.serve.app import create_app
    from diffrt.serve.service import ModelService

    service = ModelService.load(config)
    if wrap is not None:
        service.pipeline = service.worker.pipeline = wrap(service.pipeline)
    service.start()
    print(f"diffrt serve: {service.name} on {service.pipeline.device} ({service.pipeline.backend.name}) at "
          f"http://{host}:{port}  limits {service.limits.as_dict()}", file=sys.stderr, flush=True)  # fmt: skip
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        service.stop()
    return 0
