"""503 while an engine is down: a second, embedder-only application on the same cluster loses its
replica; the gateway answers 503 (OpenAI format, retry-after) until Serve has replaced it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e

APP = "ray_app_embed_only"


@pytest.fixture(scope="module")
def embed_only(ray_cluster, data_dir) -> str:
    from ray import serve

    from ray_app.serve.app import build_app

    args = {"gateway": {"status_poll_interval_s": 0.25},
            "embedders": [{"name": "all-minilm-l6-v2", "source": "all-minilm-l6-v2"}]}
    serve.run(build_app(args), name=APP, route_prefix="/embed-only")
    base = f"http://127.0.0.1:{ray_cluster.http_port}/embed-only"
    wait_for(base + "/health")
    yield base
    serve.delete(APP)


def test_503_while_the_replica_is_replaced_then_recovery(embed_only):
    import ray

    body = {"model": "all-minilm-l6-v2", "input": "hello"}
    response = httpx.post(embed_only + "/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 200, response.text

    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{APP}#Embedder")]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)

    # Requests already routed to the dead replica wait for Serve to re-route them; new ones must not
    # queue behind a deployment with no running replica. Probe continuously, without waiting on each.
    def probe() -> httpx.Response | None:
        try:
            return httpx.post(embed_only + "/v1/embeddings", json=body, timeout=3)
        except httpx.TimeoutException:
            return None

    seen_503, recovered = None, False
    deadline = time.monotonic() + 120
    with ThreadPoolExecutor(max_workers=8) as pool:
        pending = []
        while time.monotonic() < deadline and not recovered:
            pending.append(pool.submit(probe))
            time.sleep(0.25)
            for future in [f for f in pending if f.done()]:
                pending.remove(future)
                response = future.result()
                if response is None:
                    continue
                if response.status_code == 503:
                    seen_503 = response
                elif response.status_code == 200 and seen_503 is not None:
                    recovered = True
    assert seen_503 is not None, "the gateway never reported the missing replica"
    error = seen_503.json()["error"]
    assert error["code"] == "engine_unavailable" and "all-minilm-l6-v2" in error["message"]
    assert seen_503.headers["retry-after"]
    assert recovered, "Serve did not bring the replica back"
    assert httpx.get(embed_only + "/health", timeout=30).status_code == 200
