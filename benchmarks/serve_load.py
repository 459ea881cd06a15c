"""A bounded load test of `diffrt serve`: N concurrent clients for T seconds on loopback, then it stops by itself.

It starts the server itself (loopback, a free port), measures the single-request latency first (sequential
requests), runs a short warm-up load, reads the server's RSS, runs the measured load, reads the RSS again. Every
request sent is accounted for: answered 200, answered 429 (the bounded queue's deliberate refusals; the client then
waits Retry-After, at most 1 s), answered with another status (an error), or lost (no answer: a transport error or
a client timeout). One JSON row per run, with the GPU, versions and commit (benchmarks/environment.py).

    python benchmarks/serve_load.py --clients 8 --duration 20 --out results/serve_load_cpu.json
    python benchmarks/serve_load.py --model sd21 --size 512x512 --steps 1 --sampler turbo --guidance 0 \\
        --clients 32 --duration 60 --max-queue 64 --out results/serve_load_h200.json
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.results_file import write_json  # noqa: E402
from benchmarks.serve_process import rss_bytes, server_process  # noqa: E402

CLIENT_MARGIN_S = 30  # a client waits this much past the server's own timeout before it calls a request lost


def prompts(count: int) -> list[str]:
    """Distinct captions of the embedded model's grammar (more than the prompt cache holds: misses and hits)."""
    from diffrt.train import shapes

    return [shapes.sample(10**9 + i, 64, "train").caption for i in range(count)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Load:
    """Clients in threads, each sending one request at a time until the deadline; every outcome recorded."""

    def __init__(self, url: str, body: dict, texts: list[str], timeout_s: float) -> None:
        self.url, self.body, self.texts, self.timeout_s = url, body, texts, timeout_s
        self.outcomes: list[tuple[str, float]] = []  # (status code or "lost: ...", seconds)
        self._lock = threading.Lock()
        self._sent = 0

    def client(self, index: int, deadline: float) -> None:
        with httpx.Client(timeout=self.timeout_s) as http:
            i = index
            while time.monotonic() < deadline:
                with self._lock:
                    self._sent += 1
                body = {**self.body, "prompt": self.texts[i % len(self.texts)], "seed": i}
                i += 1
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{self.url}/v1/images/generations", json=body)
                    outcome, retry = str(r.status_code), r.headers.get("Retry-After")
                except httpx.HTTPError as e:
                    outcome, retry = f"lost: {type(e).__name__}", None
                with self._lock:
                    self.outcomes.append((outcome, time.perf_counter() - t0))
                if retry is not None:
                    time.sleep(min(1.0, float(retry), max(0.0, deadline - time.monotonic())))

    def run(self, clients: int, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.client, args=(i * 7919, deadline)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + self.timeout_s + 5)
        return time.perf_counter() - t0

    @property
    def sent(self) -> int:
        return self._sent


def single_latency(url: str, body: dict, texts: list[str], count: int, timeout_s: float) -> list[float]:
    """Seconds per request, one at a time (after one untimed request)."""
    times = []
    with httpx.Client(timeout=timeout_s) as http:
        for i in range(count + 1):
            t0 = time.perf_counter()
            r = http.post(f"{url}/v1/images/generations", json={**body, "prompt": texts[i % len(texts)], "seed": i})
            r.raise_for_status()
            if i:
                times.append(time.perf_counter() - t0)
    return times


def measure(args: argparse.Namespace) -> dict:
    body = {"size": args.size, "n": args.n, "steps": args.steps, "response_format": "b64_json"}
    body.update({k: v for k, v in (("sampler", args.sampler), ("guidance_scale", args.guidance)) if v is not None})
    serve = ["--max-queue", str(args.max_queue), "--timeout", str(args.timeout), "--no-warmup"]
    serve += ["--model", args.model] if args.model else []
    serve += ["--max-size", str(args.max_size)] if args.max_size else []
    texts = prompts(args.prompts)
    client_timeout = args.timeout + CLIENT_MARGIN_S
    with server_process(serve) as (url, proc):
        single = single_latency(url, body, texts, args.single, client_timeout)
        Load(url, body, texts, client_timeout).run(args.clients, args.warmup_s)  # allocator and caches settle
        rss_before = rss_bytes(proc.pid)
        load = Load(url, body, texts, client_timeout)
        wall = load.run(args.clients, args.duration)
        rss_after = rss_bytes(proc.pid)
        healthy = httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    ok = [s for o, s in load.outcomes if o == "200"]
    statuses: dict[str, int] = {}
    for outcome, _ in load.outcomes:
        statuses[outcome] = statuses.get(outcome, 0) + 1
    single_s = statistics.median(single)
    images_per_s = len(ok) * args.n / wall
    return {
        "what": "serve_load", "model": args.model or "diffrt-default", "size": args.size, "n": args.n,
        "steps": args.steps, "sampler": args.sampler, "clients": args.clients, "duration_s": args.duration,
        "max_queue": args.max_queue, "wall_s": round(wall, 3), "sent": load.sent, "answered": len(load.outcomes),
        "ok": len(ok), "status_429": statuses.get("429", 0),
        "errors": sum(c for o, c in statuses.items() if o not in ("200", "429") and not o.startswith("lost")),
        "lost": load.sent - len(load.outcomes) + sum(c for o, c in statuses.items() if o.startswith("lost")),
        "statuses": statuses, "requests_per_s": round(len(ok) / wall, 3), "images_per_s": round(images_per_s, 3),
        "p50_ms": _ms(percentile(ok, 50)), "p95_ms": _ms(percentile(ok, 95)), "p99_ms": _ms(percentile(ok, 99)),
        "single_request_ms": _ms(single_s), "single_request_images_per_s": round(args.n / single_s, 3),
        "throughput_vs_single": round(images_per_s / (args.n / single_s), 3),
        "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_growth_mb": round((rss_after - rss_before) / 2**20, 1), "healthy_after": healthy,
    }  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def write_row(path: str, row: dict) -> None:
    """Append the row to the JSON file, atomically (temporary file, then rename)."""
    rows = json.loads(Path(path).read_text())["rows"] if os.path.exists(path) else []
    write_json(path, {"rows": [*rows, row]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--size", default="64x64")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measured load")
    p.add_argument("--warmup-s", type=float, default=3.0, help="seconds of unmeasured load before the RSS reading")
    p.add_argument("--single", type=int, default=5, help="sequential requests for the single-request latency")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60.0, help="the server's per-request timeout")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None, help="JSON file to append the row to")
    args = p.parse_args(argv)
    row = {**environment(args.commit), **measure(args)}
    print(json.dumps(row, indent=1))
    if args.out:
        write_row(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
