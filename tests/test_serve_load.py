"""benchmarks/serve_load.py at a small size, as CI runs it: 6 clients for 8 s against a queue of 1, so the queue
refuses some requests (429) on purpose; nothing else may fail, every request sent is answered, and the server's
memory does not grow over the measured load."""

import json

from benchmarks import serve_load

RSS_GROWTH_LIMIT_MB = 64  # glibc's arenas move by a few MiB between readings; a leak per request would be far more


def test_bounded_load_answers_every_request_and_does_not_grow(tmp_path):
    out = tmp_path / "load.json"
    serve_load.main(["--clients", "6", "--duration", "8", "--warmup-s", "3", "--max-queue", "1", "--single", "3",
                     "--out", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ok"] > 10 and row["status_429"] > 0, row  # more clients than the queue holds: deliberate 429s
    assert row["errors"] == 0 and row["lost"] == 0 and row["answered"] == row["sent"], row["statuses"]
    assert row["healthy_after"] and row["p99_ms"] is not None and row["images_per_s"] > 0
    assert row["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB, row
    assert row["gpu"] and row["torch"] and row["commit"]
