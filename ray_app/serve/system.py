"""``GET /v1/system/status``: what the cluster is and does, in one JSON document.

Nodes with their logical resources (Ray) and physical use (CPU %, memory, each GPU's utilisation and
memory, from the Ray dashboard's node summary, which every node's agent reports), Serve deployments
and replica states, the models and promoted adapters, and each LLM's queue (requests its engine
holds, from one replica).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import httpx


async def _physical_use() -> dict[str, dict[str, Any]]:
    """node id (and IP) -> physical use, from the dashboard (empty when it is not running)."""
    from ray_app.serve.internals import dashboard_auth_headers, dashboard_url

    url = await asyncio.to_thread(dashboard_url)
    if url is None:
        return {}
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"{url}/nodes?view=summary", headers=dashboard_auth_headers())
            summary = response.json()["data"]["summary"]
    except (httpx.HTTPError, KeyError, ValueError):
        return {}
    out = {}
    for node in summary:
        mem = node.get("mem") or [0, 0, 0]  # total, available, percent
        usage = {
            "cpu_percent": node.get("cpu"),
            "memory_used_gib": round((mem[0] - mem[1]) / 2**30, 2),
            "memory_total_gib": round(mem[0] / 2**30, 2),
            "gpus": [{"name": g.get("name"), "utilization_percent": g.get("utilizationGpu"),
                      "memory_used_mib": g.get("memoryUsed"), "memory_total_mib": g.get("memoryTotal")}
                     for g in node.get("gpus") or []],
        }
        # keyed by node id, and by IP for a summary whose raylet part has not arrived yet
        out[node.get("raylet", {}).get("nodeId", "")] = usage
        out[node.get("ip", "")] = usage
    return out


def _nodes(physical: dict[str, dict]) -> list[dict[str, Any]]:
    import ray

    nodes = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        nodes.append({
            "node_id": node["NodeID"], "address": node.get("NodeManagerAddress"), "alive": node.get("Alive"),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
            "custom_resources": {k: v for k, v in resources.items()
                                 if k not in ("CPU", "GPU", "memory", "object_store_memory")
                                 and not k.startswith("node:") and not k.startswith("accelerator_type")},
            "accelerator_type": next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None),
            "usage": physical.get(node["NodeID"]) or physical.get(node.get("NodeManagerAddress", "")),
        })
    return nodes


def _deployments(status) -> dict[str, dict[str, Any]]:
    out = {}
    for app_name, app in status.applications.items():
        for name, deployment in app.deployments.items():
            out[f"{app_name}/{name}"] = {"status": str(deployment.status.value if hasattr(deployment.status, "value")
                                                       else deployment.status),
                                         "replicas": {str(k.value if hasattr(k, "value") else k): v
                                                      for k, v in deployment.replica_states.items()}}
    return out


async def system_status(models: Callable[[], Awaitable[list[dict]]],
                        queues: dict[str, Callable[[], Awaitable[int]]]) -> dict[str, Any]:
    import ray

    from ray_app.serve.internals import serve_status

    physical, status, model_list = await asyncio.gather(_physical_use(), asyncio.to_thread(serve_status), models())

    async def queue(name: str, call) -> tuple[str, int | None]:
        try:
            return name, await asyncio.wait_for(call(), timeout=5)
        except Exception:  # a replica starting or gone: unknown, not an error of this endpoint
            return name, None

    depths = dict(await asyncio.gather(*(queue(n, c) for n, c in queues.items())))
    return {
        "object": "system.status",
        "nodes": await asyncio.to_thread(_nodes, physical),
        "cluster": {"total": ray.cluster_resources(), "available": ray.available_resources()},
        "deployments": _deployments(status),
        "models": model_list,
        "queues": {name: {"unfinished_requests": depth} for name, depth in depths.items()},
    }
