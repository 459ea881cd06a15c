"""The server's Prometheus metrics, in a registry of its own (two apps in one process do not share counters)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a 1-step SD-Turbo image is ~20 ms on an H200; a 25-step SDXL 1024 one, or a queued request, many seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("diffrt_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram("diffrt_request_seconds", "HTTP request latency, end to end", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_wait = Histogram("diffrt_queue_wait_seconds", "time a generation waited for the worker",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.generation = Histogram("diffrt_generation_seconds", "time the worker ran a generation",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("diffrt_queue_depth", "generations waiting for the worker", registry=r)
        self.images = Counter("diffrt_images_generated", "images generated and returned", registry=r)
        self.steps = Counter("diffrt_denoise_steps", "denoising steps run (a cancelled request stops adding)",
                             registry=r)  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
