"""Monitoring on the real cluster: /v1/system/status and our Prometheus metrics on Ray's endpoint."""

from __future__ import annotations

import os
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e


def test_system_status_reports_nodes_deployments_models_and_queues(served):
    body = httpx.get(served.v1 + "/system/status", timeout=60).json()
    assert body["object"] == "system.status"
    node = body["nodes"][0]
    assert node["alive"] and node["cpus"] == 8  # the session's ray.init(num_cpus=8)
    assert node["usage"]["memory_total_gib"] > 1 and 0 <= node["usage"]["cpu_percent"] <= 100 * 64
    assert body["cluster"]["total"]["CPU"] == 8 and body["cluster"]["available"]["CPU"] < 8
    assert body["gateway"] == {"deployment": "LLM:smollm2-135m-instruct", "host_llm": "smollm2-135m-instruct"}
    gateway = body["deployments"]["ray_app/LLM:smollm2-135m-instruct"]
    assert gateway["status"] == "HEALTHY" and gateway["replicas"] == {"RUNNING": 1}
    assert body["queues"]["smollm2-135m-instruct"]["unfinished_requests"] == 0  # the hosted engine, read in-process
    assert {"smollm2-135m-instruct", "tiny-llama", "all-minilm-l6-v2"} <= {m["id"] for m in body["models"]}
    assert body["queues"]["tiny-llama"]["unfinished_requests"] == 0


def test_our_metrics_reach_rays_prometheus_endpoint(served, ray_cluster):
    client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0)
    client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    unknown = httpx.post(served.v1 + "/chat/completions", timeout=30,
                         json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404, unknown.text  # an empty messages list is a 400 since the public schema
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray's agents export on an interval
        text = httpx.get(ray_cluster.metrics_url, timeout=10).text
        if 'model="tiny-llama"' in text and 'status="404"' in text:  # this test's own requests, exported
            break
        time.sleep(2)
    lines = [line for line in text.splitlines() if line.startswith("ray_ray_app_")]
    assert any(line.startswith("ray_ray_app_requests_total{") and 'model="tiny-llama"' in line for line in lines), [
        line for line in lines if "requests_total" in line]
    assert any(line.startswith("ray_ray_app_tokens_total{") and 'direction="out"' in line for line in lines)
    assert any(line.startswith("ray_ray_app_errors_total{") and 'status="404"' in line for line in lines)
    assert any(line.startswith("ray_ray_app_request_seconds_bucket{") for line in lines)


def hosting_replica():
    """The session's one SmolLM2 replica process (it hosts the gateway)."""
    import psutil

    replicas = [p for p in psutil.process_iter(["cmdline"])
                if "ServeReplica:ray_app:LLM:smollm2-135m-instruct" in " ".join(p.info["cmdline"] or [])[:200]]
    assert len(replicas) == 1
    return replicas[0]


def test_the_hosting_replica_keeps_off_the_core_its_cpu_engine_computes_on(served):
    import psutil

    replica = hosting_replica()
    workers = [c for c in replica.children(recursive=True) if c.name() == "VLLM::Worker"]
    engine = {core for w in workers for core in w.cpu_affinity()}
    assert workers and engine and len(engine) < psutil.cpu_count()
    threads = {core for t in replica.threads() for core in os.sched_getaffinity(t.id)}
    assert threads and not threads & engine


def test_the_llm_replica_and_its_engine_run_at_the_clusters_niceness_not_rays_worker_niceness(served):
    replica = hosting_replica()
    raylet = replica.parent()
    assert raylet.name() == "raylet"
    engine = [c for c in replica.children(recursive=True) if c.name().startswith("VLLM::")]
    assert {c.name() for c in engine} >= {"VLLM::EngineCore", "VLLM::Worker"}
    niceness = {os.getpriority(os.PRIO_PROCESS, t.id) for p in [replica, *engine] for t in p.threads()}
    others = [p for p in raylet.children() if "ServeController" in " ".join(p.cmdline())[:200]]
    assert others and others[0].nice() == 15  # Ray's other workers keep its worker niceness
    # lowering niceness needs CAP_SYS_NICE: the tests run as root on CI
    assert niceness == ({raylet.nice()} if os.geteuid() == 0 else {15})
