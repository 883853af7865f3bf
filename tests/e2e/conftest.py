"""End-to-end fixtures: one real local Ray cluster per test session, and the real Serve app on it.

The app is the shipped ``serve_config.yaml`` application (SmolLM2 + all-MiniLM-L6-v2) plus the tiny
random Llama, served by real vLLM CPU engines behind the real gateway, over HTTP on a free port.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "ray_app"

TINY = {
    "name": "tiny-llama",
    "source": "tiny-llama",
    "cpu_kv_cache_gib": 1,
    "engine_kwargs": {
        "dtype": "float32", "enforce_eager": True, "max_model_len": 512,
        # a random model would pad JSON with whitespace forever; compact JSON keeps its output bounded
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    },
    "replicas": {"num_replicas": 1, "max_ongoing_requests": 64},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shipped_application() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]


def wait_for(url: str, timeout_s: float = 300, status: int = 200) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=10)
            if last.status_code == status:
                return last
        except httpx.HTTPError as e:
            last = e
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout_s}s (last: {last})")


@dataclass
class Cluster:
    http_port: int
    dashboard_url: str
    metrics_url: str


@dataclass
class Served:
    base_url: str  # http://127.0.0.1:PORT
    args: dict

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"


@pytest.fixture(scope="session")
def ray_cluster(data_dir):
    import ray
    from ray import serve

    # the serving mode the README starts (override by exporting the variable before pytest)
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    application = shipped_application()
    port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    ray.init(
        num_cpus=8,  # logical: the graph asks for ~3 CPUs of scheduling room on a 2-core machine
        include_dashboard=True,
        dashboard_port=dashboard_port,
        _metrics_export_port=metrics_port,
        runtime_env=application.get("runtime_env"),
        logging_level="WARNING",
        configure_logging=True,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield Cluster(http_port=port, dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                  metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """The session's MLflow tracking store and adapter registry (training writes, serving reads)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def served(ray_cluster, mlflow_uri) -> Served:
    from ray import serve

    from ray_app.serve.app import build_app

    args = copy.deepcopy(shipped_application()["args"])
    # the tiny model serves LoRA adapters from the session's registry; short lookup cache so a
    # promotion shows within the test
    args["llms"].append(copy.deepcopy(TINY) | {"adapters": {"registry_uri": mlflow_uri, "max_per_replica": 2,
                                                            "max_rank": 16, "refresh_s": 0.5}})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    base_url = f"http://127.0.0.1:{ray_cluster.http_port}"
    wait_for(base_url + "/health")
    return Served(base_url=base_url, args=args)
