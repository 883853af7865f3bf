"""Drivers for ``tests/e2e/test_cluster_nodes.py``: each starts its own multi-node Ray cluster on this
machine, exercises it, prints one ``RESULT {json}`` line and shuts the cluster down again.

    python tests/e2e/cluster_driver.py autoscale [cluster/aws.yaml]
    python tests/e2e/cluster_driver.py placement [cluster/aws.yaml] [data-dir]

They run in a subprocess of the test so that the e2e session's own ``ray.init()`` in the pytest process
is untouched. Each cluster is private to its driver:

* its temp dir (``RAY_TMPDIR``) is a fresh folder, so ``/tmp/ray/ray_current_cluster`` (which a plain
  ``ray.init()`` elsewhere on the machine would follow) is neither written nor removed;
* its ports are free ones picked here (never 6379 / 8265 / 8000);
* it is stopped through its own ``Cluster`` object, never with ``ray stop``. ``AutoscalingCluster.start``
  and ``.shutdown`` run ``ray stop --force`` (every Ray process of the user) and the wheel lacks the
  ``fake_multi_node/example.yaml`` its config is generated from, so ``PrivateAutoscalingCluster`` below
  keeps its config generation and starts the head through ``ray.cluster_utils.Cluster`` instead.
  Fake worker nodes are started by the autoscaler's monitor process and are not known to that object;
  whatever of this driver's process group (or temp dir) is still alive at the end is killed by pid.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "RESULT "

# What the AWS provider fills in for the GPU instance types of cluster/aws.yaml (EC2 DescribeInstanceTypes):
# fake nodes only advertise resources, so the GPUs (and the accelerator_type:<X> resource a real raylet
# derives from nvidia-smi) are faked from this table. CPUs are kept at 1 to keep the fake nodes light.
EC2_GPUS = {
    "g5.2xlarge": {"GPU": 1, "accelerator": "A10G"},
    "g6e.12xlarge": {"GPU": 4, "accelerator": "L40S"},
}
GPU_FAMILIES = ("g", "p")  # g5, g6e, p4d, p5, ...: EC2's GPU instance families

# ray/autoscaler/_private/fake_multi_node/example.yaml of Ray 2.60 (missing from the installed wheel).
FAKE_MULTINODE_BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_tmpdir() -> str:
    """A short (unix socket paths are limited to 107 bytes) temp dir only this driver's cluster uses."""
    path = tempfile.mkdtemp(prefix="rcl", dir="/tmp")
    os.environ["RAY_TMPDIR"] = path
    return path


def own_leftovers(tmpdir: str) -> list[int]:
    """Processes of this driver's process group, or naming its temp dir, other than the driver itself."""
    me, group, found = os.getpid(), os.getpgrp(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
            pgrp = int(stat.rsplit(")", 1)[1].split()[2])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state == "Z":
            continue
        if (pgrp == group and group == me) or tmpdir in cmdline:
            found.append(int(entry.name))
    return found


def kill_leftovers(tmpdir: str) -> list[int]:
    pids = own_leftovers(tmpdir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def load_aws(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def gpu_groups(aws: dict) -> dict[str, dict]:
    """The worker groups of the config that run on GPU instance types."""
    groups = {}
    for name, node_type in aws["available_node_types"].items():
        instance = node_type.get("node_config", {}).get("InstanceType", "")
        if name != aws["head_node_type"] and instance.startswith(GPU_FAMILIES):
            if instance not in EC2_GPUS:
                raise SystemExit(f"{name}: instance type {instance} is not in EC2_GPUS of {__file__}")
            groups[name] = node_type
    return groups


def fake_resources(node_type: dict) -> dict:
    """A group's resources as its real nodes advertise them: the config's ``resources`` plus the GPUs
    and accelerator type of its instance type (faked), with a single CPU."""
    gpus = EC2_GPUS[node_type["node_config"]["InstanceType"]]
    return {"CPU": 1, "GPU": gpus["GPU"], f"accelerator_type:{gpus['accelerator']}": 1,
            "object_store_memory": 100 * 1024 * 1024, **node_type.get("resources", {})}


# ---------------------------------------------------------------------------------------------------
# autoscaling from zero


def _autoscaling_cluster_class():
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.cluster_utils import AutoscalingCluster, Cluster

    class PrivateAutoscalingCluster(AutoscalingCluster):
        """``AutoscalingCluster`` with its config built from an inline base and a private head."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = copy.deepcopy(FAKE_MULTINODE_BASE)
            config["available_node_types"] = copy.deepcopy(worker_node_types)
            config["available_node_types"]["ray.head.default"] = {
                "resources": head_resources, "node_config": {}, "max_workers": 0}
            if autoscaler_v2:
                config["provider"]["launch_multiple"] = True
                config["provider"]["head_node_id"] = FAKE_HEAD_NODE_ID
            config.update(config_kwargs)
            return config

        def start(self, _system_config=None, override_env=None):
            import ray

            port = free_port()
            # the fake provider starts worker nodes against <ip>:6379 unless told otherwise
            self._config["provider"]["gcs_address"] = f"{ray.util.get_node_ip_address()}:{port}"
            config_path = Path(os.environ["RAY_TMPDIR"]) / "autoscaling.json"
            config_path.write_text(json.dumps(self._config))
            # what `ray start` gets from AutoscalingCluster.start; the monitor process inherits it
            os.environ.update({"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                               **(override_env or {})})
            resources = dict(self._head_resources)
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "gcs_server_port": port,
                "autoscaling_config": str(config_path),
                "num_cpus": resources.pop("CPU", 0),
                "num_gpus": resources.pop("GPU", 0),
                "resources": resources,
                "include_dashboard": False,
                # `ray start --head` under RAY_FAKE_CLUSTER: the head is the provider's fake head node
                "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
                "_system_config": _system_config or {},
            })
            return self.cluster.address

        def shutdown(self):
            self.cluster.shutdown()

    return PrivateAutoscalingCluster


def autoscale(aws_path: str) -> dict:
    import ray

    aws = load_aws(aws_path)
    groups = gpu_groups(aws)
    worker_node_types = {
        name: {"resources": fake_resources(t), "node_config": {}, "min_workers": t.get("min_workers", 0),
               "max_workers": t.get("max_workers", aws["max_workers"])}
        for name, t in groups.items()
    }
    head_resources = dict(aws["available_node_types"][aws["head_node_type"]].get("resources", {}))
    result: dict = {"worker_node_types": worker_node_types, "head_resources": dict(head_resources),
                    "timings": {}}
    t0 = time.monotonic()
    cluster = _autoscaling_cluster_class()(
        head_resources, worker_node_types,
        max_workers=aws["max_workers"], upscaling_speed=aws.get("upscaling_speed", 1.0),
        idle_timeout_minutes=0.1,  # aws.yaml: 10
    )
    try:
        address = cluster.start()
        result["timings"]["head_up_s"] = round(time.monotonic() - t0, 1)
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")

        def alive_nodes() -> list[dict]:
            return [n for n in ray.nodes() if n["Alive"]]

        # Let the autoscaler run a few rounds first: a GPU group with min_workers > 0 would be started now.
        time.sleep(5)
        initial = alive_nodes()
        result["initial"] = {"node_ids": [n["NodeID"] for n in initial],
                             "head_node_id": ray.get_runtime_context().get_node_id(),
                             "cluster_resources": ray.cluster_resources()}

        @ray.remote
        def where() -> dict:
            ctx = ray.get_runtime_context()
            return {"node_id": ctx.get_node_id(), "gpu_ids": ray.get_gpu_ids(),
                    "node_type": os.environ.get("RAY_NODE_TYPE_NAME")}

        # One task per GPU group, asking for a GPU plus the group's custom resource (as the Serve and
        # training configs do); both at once, so the autoscaler launches both groups in one go.
        t1 = time.monotonic()
        refs = {}
        for name, t in groups.items():
            custom = {k: 1 for k in t.get("resources", {})}
            refs[name] = where.options(num_cpus=1, num_gpus=1, resources=custom).remote()
        tasks = {}
        for name, ref in refs.items():
            tasks[name] = ray.get(ref, timeout=180) | {"done_after_s": round(time.monotonic() - t1, 1)}
        result["timings"]["scale_up_and_run_s"] = round(time.monotonic() - t1, 1)
        nodes = {n["NodeID"]: n for n in ray.nodes()}
        for name, task in tasks.items():
            node = nodes[task["node_id"]]
            task["node_resources"] = node["Resources"]
            task["node_labels"] = node.get("Labels", {})
        result["tasks"] = tasks
        result["peak_alive_nodes"] = len(alive_nodes())

        # Idle timeout (0.1 min) -> the autoscaler terminates the launched nodes again.
        t2 = time.monotonic()
        launched = {task["node_id"] for task in tasks.values()}
        deadline = t2 + 120
        while time.monotonic() < deadline:
            if not launched & {n["NodeID"] for n in alive_nodes()}:
                break
            time.sleep(1)
        result["timings"]["scale_down_s"] = round(time.monotonic() - t2, 1)
        result["final"] = {"node_ids": [n["NodeID"] for n in alive_nodes()],
                           "cluster_resources": ray.cluster_resources()}
        result["timings"]["total_s"] = round(time.monotonic() - t0, 1)
        return result
    finally:
        ray.shutdown()
        if getattr(cluster, "cluster", None) is not None:
            cluster.shutdown()


# ---------------------------------------------------------------------------------------------------
# head + worker placement of a Serve deployment


def _ddp_step(config: dict) -> None:
    """One DDP step: rank r sees inputs of value r + 1, so the all-reduced gradient is their mean."""
    import torch
    import torch.distributed as dist

    import ray
    import ray.train
    import ray.train.torch

    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1, bias=False))
    rank = ray.train.get_context().get_world_rank()
    model(torch.full((2, 4), float(rank + 1))).sum().backward()
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:  # Train V2 keeps reported metrics only with a checkpoint: write them out instead
        with open(config["out"], "w") as f:
            json.dump({"nodes": nodes, "weight_grad": next(model.parameters()).grad.flatten().tolist()}, f)


def ddp_across_nodes(storage: str) -> dict:
    """Two Ray Train workers, one per node (STRICT_SPREAD), training one DDP step over gloo."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(storage, "ddp.json")
    trainer = TorchTrainer(
        _ddp_step, train_loop_config={"out": out},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="spread", storage_path=storage))
    trainer.fit()
    with open(out) as f:
        return json.load(f)


def placement(aws_path: str, data_dir: str | None) -> dict:
    import ray
    import yaml
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from ray_app.models.resolve import resolve_source
    from ray_app.paths import DataDir
    from ray_app.serve.config import EmbedderConfigModel
    from ray_app.serve.embedder import build_embedder_deployment

    aws = load_aws(aws_path)
    group_name = "gpu_small"
    group_resources = dict(aws["available_node_types"][group_name]["resources"])  # {small_gpu: 1}
    head_resources = dict(aws["available_node_types"][aws["head_node_type"]].get("resources", {}))
    application = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    # The shipped embedder entry, asked onto the worker group by its custom resource (the `resources`
    # of its replica settings, which the deployment passes on as ray_actor_options).
    entry = copy.deepcopy(application["args"]["embedders"][0])
    entry["replicas"]["resources"] = {name: 0.01 for name in group_resources}
    config = EmbedderConfigModel.model_validate(entry)
    model_path = resolve_source(config.source, DataDir.from_path(data_dir))

    result: dict = {"group": group_name, "group_resources": group_resources,
                    "ray_actor_options": config.replicas.ray_actor_options(), "timings": {}}
    t0 = time.monotonic()
    cluster = Cluster()
    try:
        head = cluster.add_node(num_cpus=head_resources.get("CPU", 2), include_dashboard=True,
                                dashboard_port=free_port(), gcs_server_port=free_port())
        worker = cluster.add_node(num_cpus=1, resources=group_resources)
        cluster.wait_for_nodes()
        result["head_node_id"], result["worker_node_id"] = head.node_id, worker.node_id
        result["timings"]["cluster_up_s"] = round(time.monotonic() - t0, 1)
        ray.init(address=cluster.address, runtime_env=application.get("runtime_env"), log_to_driver=False,
                 logging_level="WARNING")
        result["driver_node_id"] = ray.get_runtime_context().get_node_id()

        t1 = time.monotonic()
        serve.start(proxy_location="Disabled")
        deployment = build_embedder_deployment(config, model_path)
        handle = serve.run(deployment, name="placement", route_prefix=None)
        result["timings"]["deploy_s"] = round(time.monotonic() - t1, 1)
        request = handle.embed.remote(["Ray places this replica on the worker group."])
        embeddings = request.result(timeout_s=120)
        result["embedding_shape"] = list(embeddings.vectors.shape)
        result["token_counts"] = embeddings.token_counts

        status = serve.status()
        app = status.applications["placement"]
        result["app_status"] = str(app.status.value if hasattr(app.status, "value") else app.status)
        result["deployments"] = {
            name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                   "replica_states": {str(k.value if hasattr(k, "value") else k): v
                                      for k, v in d.replica_states.items()}}
            for name, d in app.deployments.items()
        }
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
        result["actors"] = [{"class_name": a.class_name, "name": a.name, "node_id": a.node_id,
                             "required_resources": a.required_resources} for a in actors]
        serve.delete("placement")  # free the worker's CPU share for the training workers

        t2 = time.monotonic()
        result["train"] = ddp_across_nodes(tempfile.mkdtemp(prefix="train-", dir=os.environ.get("RAY_TMPDIR")))
        result["timings"]["train_s"] = round(time.monotonic() - t2, 1)
        result["timings"]["total_s"] = round(time.monotonic() - t0, 1)
        return result
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def main(argv: list[str]) -> int:
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # own process group: what is left of it at the end is this driver's
    mode = argv[1]
    aws_path = argv[2] if len(argv) > 2 else str(ROOT / "cluster" / "aws.yaml")
    tmpdir = private_tmpdir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("RAY_ADDRESS", None)
    ok = False
    try:
        if mode == "autoscale":
            result = autoscale(aws_path)
        elif mode == "placement":
            result = placement(aws_path, argv[3] if len(argv) > 3 else None)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        ok = True
    finally:
        time.sleep(1)
        killed = kill_leftovers(tmpdir)
        if killed:
            log(f"killed leftover processes of this driver: {killed}")
            time.sleep(1)
        if ok:
            result["tmpdir"] = tmpdir
            result["killed_leftovers"] = len(killed)
            result["leftovers_after_kill"] = own_leftovers(tmpdir)
            print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
            shutil.rmtree(tmpdir, ignore_errors=True)
        else:
            log(f"driver failed; logs kept under {tmpdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
