"""Real multi-node Ray clusters on one machine, proving what the configs under ``cluster/`` promise.

* ``test_gpu_groups_scale_from_zero_and_back``: the GPU worker groups of ``cluster/aws.yaml`` (every
  group on a GPU instance type: ``gpu_small``, ``gpu_large``), with their ``resources``, ``min_workers``
  and ``max_workers`` as configured, become the node types of Ray's fake multi-node autoscaler (GPU counts
  and accelerator types faked from the instance type; a fake node only advertises resources). It proves
  that the cluster starts without any GPU (``min_workers: 0``), that a task asking for ``num_gpus=1``
  plus a group's custom resource (``small_gpu`` / ``large_gpu``, what the Serve and training configs
  ask for) makes the autoscaler launch a new node of exactly that group, that the task runs there and
  gets a GPU, and that the node is terminated again once idle (``idle_timeout_minutes`` shortened to 0.1).
* ``test_serve_replica_lands_on_the_worker_group``: a head with ``aws.yaml``'s head resources and one
  worker advertising ``gpu_small``'s ``resources``; the project's own Embedder deployment
  (``build_embedder_deployment``, the shipped ``serve_config.yaml`` entry, model
  ``data/models/all-minilm-l6-v2``) with ``replicas.resources: {small_gpu: 0.01}``. It proves that
  ``ReplicaSettings.resources`` reaches the replica actor's required resources, that the replica runs
  on the worker node while the Serve controller stays on the head, and that an embedding through the
  deployment handle comes back as a 384-dimensional vector. Then two Ray Train workers, spread one
  per node, train one DDP step together: their all-reduced gradient proves the nodes talk over gloo.

Each cluster runs in ``tests/e2e/cluster_driver.py`` in a subprocess (its own process group, temp dir
and ports), so the session's local Ray in this process is untouched; the driver shuts its cluster down
and the tests check that none of its processes is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

from ray_app.serve import SERVING_ENV
from tests.e2e.conftest import kill_session

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "e2e" / "cluster_driver.py"
AWS = ROOT / "cluster" / "aws.yaml"


def run_driver(*args: str, timeout_s: float) -> dict:
    # its own cluster and serving mode: nothing of the session's (a throughput-optimized Serve refuses a
    # handle called outside an event loop, which the driver does)
    drop = ("RAY_ADDRESS", "RAY_TMPDIR", "RAY_JOB_CONFIG_JSON_ENV_VAR", *SERVING_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    proc = subprocess.Popen([sys.executable, str(DRIVER), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)  # the driver's session: its cluster's processes
        out, err = proc.communicate()
        pytest.fail(f"cluster driver {args} ran past {timeout_s}s\n{err[-6000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver {args} failed (rc {proc.returncode})\n{err[-8000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def assert_no_processes_left(result: dict) -> None:
    assert result["leftovers_after_kill"] == [], result["leftovers_after_kill"]
    tmpdir = result["tmpdir"]
    time.sleep(0.5)
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tmpdir.encode() in (entry / "cmdline").read_bytes():
                    left.append(int(entry.name))
            except OSError:
                pass
    assert left == [], f"processes of the driver's cluster still running: {left}"


def test_gpu_groups_scale_from_zero_and_back():
    aws = yaml.safe_load(AWS.read_text())
    result = run_driver("autoscale", str(AWS), timeout_s=420)
    groups = result["worker_node_types"]
    # the GPU groups of the config, each scaling from zero
    assert set(groups) == {"gpu_small", "gpu_large"}
    for name, node_type in groups.items():
        configured = aws["available_node_types"][name]
        assert node_type["min_workers"] == configured["min_workers"] == 0, name
        assert node_type["max_workers"] == configured["max_workers"] > 0, name
        assert configured["resources"], f"{name} defines no custom resource to land work on"
        assert configured["resources"].items() <= node_type["resources"].items()
    customs = {r for name in groups for r in aws["available_node_types"][name]["resources"]}

    # at start: the head alone, no GPU, no GPU-group resource
    initial = result["initial"]
    assert initial["node_ids"] == [initial["head_node_id"]], initial
    assert initial["cluster_resources"].get("GPU", 0) == 0
    assert not customs & set(initial["cluster_resources"]), initial["cluster_resources"]
    assert initial["cluster_resources"]["CPU"] == aws["available_node_types"]["head"]["resources"]["CPU"]

    # each GPU task ran on a node launched for it, of the group whose custom resource it asked for
    tasks = result["tasks"]
    assert set(tasks) == set(groups)
    assert len({t["node_id"] for t in tasks.values()}) == len(tasks)
    for name, task in tasks.items():
        assert task["node_id"] not in initial["node_ids"], (name, task)
        expected = groups[name]["resources"]
        node = task["node_resources"]
        for resource in aws["available_node_types"][name]["resources"]:
            assert node.get(resource) == expected[resource], (name, node)
        assert not (customs - set(aws["available_node_types"][name]["resources"])) & set(node), (name, node)
        assert node["GPU"] == expected["GPU"] and len(task["gpu_ids"]) == 1, (name, task)
        assert task["node_type"] == name, task
    assert result["peak_alive_nodes"] == 1 + len(groups)

    # idle nodes go away again: back to the head alone, no GPU
    final = result["final"]
    assert final["node_ids"] == [initial["head_node_id"]], (final, result["timings"])
    assert final["cluster_resources"].get("GPU", 0) == 0 and not customs & set(final["cluster_resources"])
    print("timings", result["timings"])
    assert_no_processes_left(result)


def test_serve_replica_lands_on_the_worker_group(data_dir):
    result = run_driver("placement", str(AWS), str(data_dir.root), timeout_s=420)
    aws = yaml.safe_load(AWS.read_text())
    group = aws["available_node_types"]["gpu_small"]["resources"]
    assert result["group_resources"] == group and group
    assert result["ray_actor_options"]["resources"] == {name: 0.01 for name in group}
    head, worker = result["head_node_id"], result["worker_node_id"]
    assert head != worker and result["driver_node_id"] == head

    assert result["app_status"] == "RUNNING", result
    (deployment,) = result["deployments"].values()
    assert deployment["status"] == "HEALTHY" and deployment["replica_states"] == {"RUNNING": 1}, deployment
    assert result["embedding_shape"] == [1, 384] and result["token_counts"][0] > 0

    replicas = [a for a in result["actors"] if a["class_name"].startswith("ServeReplica:placement:Embedder")]
    assert len(replicas) == 1, result["actors"]
    (replica,) = replicas
    assert replica["node_id"] == worker, (replica, head, worker)
    assert {k: replica["required_resources"].get(k) for k in group} == {k: 0.01 for k in group}, replica
    controller = [a for a in result["actors"] if a["class_name"] == "ServeController"]
    assert [c["node_id"] for c in controller] == [head], result["actors"]

    # Ray Train: two workers spread over the two nodes train one DDP step together over gloo; the
    # gradient is the mean of both ranks' (2 x 1.0 and 2 x 2.0 per weight), so it crossed the nodes.
    assert sorted(result["train"]["nodes"]) == sorted([head, worker]), result["train"]
    assert result["train"]["weight_grad"] == [3.0, 3.0, 3.0, 3.0], result["train"]
    print("timings", result["timings"])
    assert_no_processes_left(result)
