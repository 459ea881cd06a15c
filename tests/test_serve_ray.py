"""Ray Serve with two CPU replicas of the embedded model on a local Ray instance: concurrent HTTP requests are
served by both replicas and none fails; a replica killed mid-load loses no accepted request (each is answered, with
its images or an error status; none is left without an answer), and the survivors keep serving."""

import base64
import concurrent.futures
import time

import httpx
import pytest

from tests.helpers.serve_process import free_port, judge_reads, picture

ray = pytest.importorskip("ray", reason="the Ray Serve tests need the test extra (ray[serve])")
serve = pytest.importorskip("ray.serve")
PROMPT = "a blue triangle to the left of a white circle, red background"


@pytest.fixture(scope="module")
def cluster():
    from diffrt.serve.ray_app import deployment
    from diffrt.serve.service import ServeConfig

    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(ServeConfig(max_queue=4), replicas=2, gpus=0), name="diffrt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, steps: int = 4, seed: int = 0) -> httpx.Response | str:
    try:
        return httpx.post(f"{url}/v1/images/generations", timeout=120,
                          json={"prompt": PROMPT, "size": "64x64", "steps": steps, "seed": seed})  # fmt: skip
    except httpx.HTTPError as e:  # no answer at all: a lost request
        return f"lost: {type(e).__name__}: {e}"


def concurrently(url: str, count: int, steps: int = 4, during=None) -> list:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, url, steps, i) for i in range(count)]
        if during is not None:
            during()
        return [f.result(timeout=180) for f in futures]


@pytest.mark.timeout(300)
def test_two_replicas_serve_concurrent_requests(cluster):
    responses = concurrently(cluster, 16)
    assert all(not isinstance(r, str) and r.status_code == 200 for r in responses), responses
    replicas = {r.headers["x-diffrt-replica"] for r in responses}
    assert len(replicas) == 2, f"served by {replicas}"
    pixels = picture(base64.b64decode(responses[0].json()["data"][0]["b64_json"]))
    assert judge_reads(pixels, PROMPT)["all"] == 1.0
    url = httpx.post(f"{cluster}/v1/images/generations", timeout=60,
                     json={"prompt": PROMPT, "response_format": "url"}).json()["data"][0]["url"]  # fmt: skip
    for _ in range(4):  # any replica serves it: the store is shared
        assert httpx.get(url, timeout=30).status_code == 200


@pytest.mark.timeout(300)
def test_a_replica_killed_mid_load_loses_no_request(cluster):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::diffrt#")]  # fmt: skip
    assert len(names) == 2, names
    victim = ray.get_actor(names[0], namespace="serve")

    def kill_one():
        time.sleep(1.5)  # both replicas are mid-generation by now
        ray.kill(victim, no_restart=True)

    responses = concurrently(cluster, 24, steps=8, during=kill_one)
    lost = [r for r in responses if isinstance(r, str)]
    assert not lost, f"{len(lost)} requests got no answer: {lost[:3]}"
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) >= 12, statuses  # the survivor (and Ray's retries) carried most of the load
    assert all(s == 200 or s >= 500 for s in statuses), statuses  # the rest answered with a server error
    after = concurrently(cluster, 6)
    assert all(not isinstance(r, str) and r.status_code == 200 for r in after), after
