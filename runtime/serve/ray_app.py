"""Scale-out on Ray Serve (the `ray` extra): one replica per GPU, each the same app over its own model and worker.

Each replica loads the model once, warms it up, and serves `create_app`'s API through a FastAPI ingress built in
the replica (Ray pickles an ingress app by value, so the app is made per replica by `__serve_build_asgi_app__`,
around that replica's own service). Backpressure is Ray's `max_ongoing_requests` per replica (the worker's queue
plus the one running) in front of the worker's own bounded queue; when every replica is full and Ray's router
queue too, Ray answers 503. `check_health` fails a replica whose worker died, and Ray replaces it. url responses
go to one shared store actor, so any replica can serve any image. Without a GPU the replicas run on the CPU (the
embedded model by default), which is how CI tests this.

    diffrt serve --ray --replicas 2
    serve run diffrt.serve.ray_app:app                            # the embedded model, one replica per local GPU
    serve run diffrt.serve.ray_app:build_app model=PATH replicas=4 max_queue=8
"""

import os
import sys
import time

import ray
import torch
from ray import serve

from diffrt.serve.app import create_app
from diffrt.serve.image_store import ImageStore
from diffrt.serve.service import ModelService, ServeConfig

STORE_ACTOR = "diffrt-image-store"
READY_TIMEOUT_S = 600  # a replica's load and warm-up (CUDA graph capture included); Ray routes to it only after


@ray.remote(num_cpus=0)
class ImageStoreActor:
    """One ImageStore for all replicas."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.store = ImageStore(max_bytes, ttl_s)

    async def put(self, data: bytes, media_type: str) -> str:
        return await self.store.put(data, media_type)

    async def get(self, image_id: str):
        return await self.store.get(image_id)


class SharedImageStore:
    """ImageStore's interface over the shared actor (made by the first replica that asks)."""

    def __init__(self, config: ServeConfig) -> None:
        self.actor = ImageStoreActor.options(name=STORE_ACTOR, get_if_exists=True, lifetime="detached").remote(
            config.image_store_bytes, config.image_ttl_s
        )

    async def put(self, data: bytes, media_type: str) -> str:
        return await self.actor.put.remote(data, media_type)

    async def get(self, image_id: str):
        return await self.actor.get.remote(image_id)


@serve.deployment(name="diffrt", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class DiffrtReplica:
    def __init__(self, config: ServeConfig) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.service = ModelService.load(config, SharedImageStore(config)).start()
        if not self.service.worker.ready.wait(READY_TIMEOUT_S) or not self.service.ready:
            raise RuntimeError(
                f"replica {self.replica_id}: the model did not warm up: {self.service.worker.warmup_error}"
            )

    def __serve_build_asgi_app__(self):
        return create_app(self.service, replica_id=self.replica_id)

    def check_health(self) -> None:
        if not self.service.healthy:
            raise RuntimeError(f"replica {self.replica_id}: the model's worker thread is not running")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()


def deployment(config: ServeConfig, replicas: int | None = None, gpus: int | None = None):
    """The bound application: `replicas` (default one per GPU, else 1), a GPU each where there are GPUs."""
    if gpus is None:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()
    replicas = replicas or max(1, gpus)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    return DiffrtReplica.options(
        num_replicas=replicas,
        ray_actor_options=resources,
        max_ongoing_requests=config.max_queue + 1,  # the worker's queue plus the job it runs
        max_queued_requests=4 * config.max_queue * replicas,  # past this Ray answers 503 at once
    ).bind(config)


def build_app(args: dict):
    """`serve run diffrt.serve.ray_app:build_app key=value ...` with ServeConfig's fields and `replicas`."""
    fields = {k: v for k, v in args.items() if k != "replicas"}
    for name in ("max_queue", "max_size", "max_n", "max_steps"):
        if name in fields:
            fields[name] = int(fields[name])
    if "timeout_s" in fields:
        fields["timeout_s"] = float(fields["timeout_s"])
    replicas = int(args["replicas"]) if "replicas" in args else None
    return deployment(ServeConfig(**fields), replicas)


def run_local(config: ServeConfig, *, replicas: int | None, host: str, port: int) -> int:
    """`diffrt serve --ray`: a local Ray instance (or the one RAY_ADDRESS names), the app on host:port, until
    interrupted."""
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(config, replicas), name="diffrt", route_prefix="/")
        print(f"diffrt serve --ray: ready at http://{host}:{port}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


# `serve run diffrt.serve.ray_app:app`: the embedded model, one replica per GPU of this machine (binding loads nothing).
app = deployment(ServeConfig())
