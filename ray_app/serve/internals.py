"""Every private or unstable name of Ray and vLLM that ray_app uses, imported here and nowhere else.

Each has no public equivalent in the pinned versions (Ray 2.60, vLLM 0.32); where one appears, use it
and drop the name from this module. ``tests/unit/test_internals.py`` imports all of them, so an upgrade
that moves or renames one fails there, loudly, instead of deep inside a replica.
"""

from __future__ import annotations

from typing import Any

# ray.serve.llm's ingress materialises pydantic's lazy iterators (tool_calls) before a chat request
# crosses a handle; a request that skips it fails to pickle.
from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request as sanitize_chat_request
# the normalisation an LLMServer replica applies to dict-valued engine arguments, to check them early
from ray.llm._internal.serve.engines.vllm.vllm_engine import _normalize_vllm_engine_kwargs as normalize_engine_kwargs
# ray.serve.llm's LoRA loading reads only cloud buckets; ours subclasses its loader
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
# the error object an LLMServer yields: vLLM's (ray.serve.llm's public ErrorResponse subclasses it)
from vllm.entrypoints.serve.engine.protocol import ErrorResponse as EngineErrorResponse

__all__ = ["DiskMultiplexConfig", "EngineErrorResponse", "LoraModelLoader", "dashboard_auth_headers", "dashboard_url",
           "engine_unfinished_requests", "global_id_manager", "load_adapter", "normalize_engine_kwargs",
           "sanitize_chat_request", "serve_status", "status_from_details"]


def engine_unfinished_requests(server: Any) -> int:
    """Requests a ray.serve.llm LLMServer's vLLM engine still holds (running or waiting)."""
    return server.engine._engine_client.get_num_unfinished_requests()


async def load_adapter(server: Any, model_id: str) -> None:
    """Load a pinned adapter id into a ray.serve.llm LLMServer's engine (LRU, ``max_per_replica``), as its
    multiplexed request path does for a handle call; for a call made inside the replica itself."""
    await server.engine.resolve_lora(await server._load_model(model_id))


def serve_status():
    """What ``serve.status()`` returns, read from the controller's details without validating every
    deployment's config: ``serve.status()`` cloudpickles each deployment's request-router class, ~20 ms
    of CPU per call (over 100 ms under load) in a process with vLLM's modules imported; this is ~1 ms."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeStatus

    client = _get_global_client(raise_if_no_controller_running=False)
    return ServeStatus() if client is None else status_from_details(client.get_serve_details())


def status_from_details(details: dict[str, Any]):
    """``ServeInstanceDetails._get_status`` over the controller's plain dict."""
    from collections import Counter

    from ray.serve.schema import (ApplicationStatus, ApplicationStatusOverview, DeploymentStatus,
                                  DeploymentStatusOverview, DeploymentStatusTrigger, ProxyStatus, ReplicaState,
                                  ServeStatus)

    return ServeStatus(
        target_capacity=details.get("target_capacity"),
        proxies={node: ProxyStatus(proxy["status"]) for node, proxy in (details.get("proxies") or {}).items()},
        applications={name: ApplicationStatusOverview(
            status=ApplicationStatus(app["status"]), message=app.get("message") or "",
            last_deployed_time_s=app.get("last_deployed_time_s") or 0,
            deployments={dname: DeploymentStatusOverview(
                status=DeploymentStatus(d["status"]), status_trigger=DeploymentStatusTrigger(d["status_trigger"]),
                replica_states=dict(Counter(ReplicaState(r["state"]) for r in d.get("replicas") or [])),
                message=d.get("message") or "") for dname, d in (app.get("deployments") or {}).items()})
            for name, app in (details.get("applications") or {}).items()})


def dashboard_url() -> str | None:
    """The Ray dashboard's URL as the cluster advertises it (None when it is not running)."""
    from ray._private.services import get_webui_url_from_internal_kv

    url = get_webui_url_from_internal_kv()
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def dashboard_auth_headers() -> dict[str, str]:
    """The headers Ray's own SDK sends to a token-authenticated dashboard."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return get_auth_headers_if_auth_enabled({})
