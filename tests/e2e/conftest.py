"""End-to-end fixtures: one real local Ray cluster per test session, and the real Serve app on it.

The app is the shipped ``serve_config.yaml`` application (SmolLM2 + all-MiniLM-L6-v2) plus the tiny
random Llama, served by real vLLM CPU engines behind the real gateway, over HTTP on a free port.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from benchmarks.common import free_port, prepare_local_ray
from ray_app.serve import SERVING_ENV

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


def pytest_collection_modifyitems(config, items):
    # the journey starts a cluster the README's way, on the machine's default addresses: before the
    # session's own cluster exists (a stable sort keeps every other test's order)
    items.sort(key=lambda item: item.path.name != "test_journey.py")


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


def session_processes(leader: int) -> dict[int, str]:
    """The processes still running in the session that ``leader`` opened (``start_new_session=True``), with
    their command lines: everything it started, however deep. vLLM's engine processes take a process group
    of their own, so a group kill misses them; they keep the session."""
    found = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if os.getsid(p.pid) == leader:
                found[p.pid] = " ".join(p.info["cmdline"] or [p.info["name"]])[:120]
        except (OSError, psutil.Error):
            pass
    return found


def kill_session(leader: int) -> None:
    for pid in session_processes(leader):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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

    # the serving mode the README starts (override by exporting a variable before pytest), beside a server
    # the user runs on the same machine
    prepare_local_ray(SERVING_ENV)
    # Credentials for the loopback stand-ins of the cloud providers, in the environment as in production:
    # the cluster's workers inherit it. boto3 signs with these (SigV4); the servers never see a real key.
    os.environ.update({"RAY_APP_TEST_OPENAI_KEY": "sk-loopback", "AWS_ACCESS_KEY_ID": "AKIALOOPBACK",
                       "AWS_SECRET_ACCESS_KEY": "loopback-secret", "AWS_EC2_METADATA_DISABLED": "true"})
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


@dataclass
class Clouds:
    """Loopback servers speaking OpenAI's (and Azure's) and Bedrock's wire protocols, recording
    every request: the router's cloud targets in the e2e app."""

    openai: object
    bedrock: object

    def reset(self) -> None:
        self.openai.reset()
        self.bedrock.reset()

    def bodies(self) -> list[str]:
        return [json.dumps(r.body) for r in self.openai.requests + self.bedrock.requests]


@pytest.fixture(scope="session")
def clouds() -> Clouds:
    from tests.router_servers import BedrockServer, OpenAIServer

    servers = Clouds(OpenAIServer("Hello from the OpenAI stand-in").start(),
                     BedrockServer("Hello from the Bedrock stand-in").start())
    yield servers
    servers.openai.stop()
    servers.bedrock.stop()


def router_config(clouds: Clouds) -> dict:
    """configs/router.yaml's local target and routes, with the cloud targets on loopback."""
    shipped = yaml.safe_load((ROOT / "configs" / "router.yaml").read_text())
    cloud = {"price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0, "context_window": 16000, "quality": 7,
             "capabilities": ["chat", "code", "math", "summarize", "multilingual"], "timeout_s": 10,
             "max_retries": 1}
    targets = [t for t in shipped["targets"] if t["kind"] == "local"] + [
        cloud | {"name": "openai-loop", "kind": "openai", "model": "gpt-loop", "base_url": clouds.openai.url + "/v1",
                 "api_key_env": "RAY_APP_TEST_OPENAI_KEY"},
        cloud | {"name": "azure-loop", "kind": "azure", "model": "gpt-deploy", "base_url": clouds.openai.url,
                 "api_version": "2024-10-21", "api_key_env": "RAY_APP_TEST_OPENAI_KEY"},
        cloud | {"name": "bedrock-loop", "kind": "bedrock", "model": "anthropic.claude-loop", "region": "us-east-1",
                 "endpoint_url": clouds.bedrock.url, "price_in_per_mtok": 3.0, "price_out_per_mtok": 4.0},
    ]
    local = [t["name"] for t in targets if t["kind"] == "local"]
    return {"targets": targets,
            "routes": {"auto": {"targets": local + ["openai-loop", "bedrock-loop"]},
                       "cloud": {"targets": ["openai-loop", "bedrock-loop"], "prefer": "order"},
                       "azure": {"targets": ["azure-loop"]},
                       "private": {"targets": local, "allow_cloud": False}},
            "policy": {"breaker": {"failure_threshold": 3, "cooldown_s": 2}}}


@pytest.fixture(scope="session")
def served(ray_cluster, mlflow_uri, clouds, tmp_path_factory) -> Served:
    from ray import serve

    from ray_app.serve.app import build_app

    args = copy.deepcopy(shipped_application()["args"])
    # the shipped SmolLM2 serves adapters from the default data dir's registry; here it serves none,
    # so a request for one gets the "serves no adapters" answer the training tests check
    args["llms"][0].pop("adapters", None)
    # the tiny model serves LoRA adapters from the session's registry; short lookup cache so a
    # promotion shows within the test
    args["llms"].append(copy.deepcopy(TINY) | {"adapters": {"registry_uri": mlflow_uri, "max_per_replica": 2,
                                                            "max_rank": 16, "refresh_s": 0.5}})
    args["router"]["config"] = router_config(clouds)
    args["auth"] |= {"ledger_path": str(tmp_path_factory.mktemp("router") / "ledger.sqlite"), "default_rpm": 600}
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    base_url = f"http://127.0.0.1:{ray_cluster.http_port}"
    wait_for(base_url + "/health")
    return Served(base_url=base_url, args=args)
