"""Connecting a job to Ray, and sharing the cluster's logical CPUs with what already runs on it.

Every job (ingest, a dataset build, fine-tuning) and the CLI connect the same way: to the cluster
the server runs on when there is one (``--address``, ``RAY_ADDRESS``, or the local cluster
``serve run`` started), so their writes land in the collections and registry the server reads;
otherwise they start a local Ray of their own.

``serve run serve_config.yaml`` on a laptop gives Ray the machine's cores as logical CPUs, and the
Serve graph reserves most of them. A job whose stages ask for more logical CPUs than are free would
wait forever with no output. ``fit`` (the default ``cluster_share: fit``) scales a job's requests down
to what is free, keeping their proportions, and says so; the operating system then shares the cores
between the job and the server, which keeps answering, more slowly. ``cluster_share: strict`` keeps
the requests as configured: right on a cluster that autoscales (a pending demand is what makes the
autoscaler add a node) or has cores to spare.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Literal

logger = logging.getLogger("ray_app.cluster")

ClusterShare = Literal["fit", "strict"]
MIN_CPUS = 0.01  # Ray refuses 0 for some workers (Tune trials, Train's workers want > 0)

__all__ = ["ClusterShare", "Demand", "connect_if_running", "fit", "free_cpus", "in_cluster", "init_ray",
           "prepare_driver_env", "share_cpus", "worker_env_vars"]


def prepare_driver_env() -> None:
    """What a driver process (the CLI, a job script) sets before it imports Ray: a local cluster
    (``serve run``, ``ray start``) enables Ray's token authentication and writes the token to
    ``~/.ray/auth_token``, and a driver joining it must use tokens too (Ray reads the mode when it is
    imported, so this runs first, at the entry points)."""
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token)):
        os.environ["RAY_AUTH_MODE"] = "token"


def worker_env_vars(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a driver gives the Ray workers it starts, plus ``extra``: the model hub stays
    offline unless this process's ``HF_HUB_OFFLINE`` says otherwise, tokenizers use one thread."""
    return {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
            **(extra or {})}


def init_ray(address: str | None = None, *, job_cpus: int | None = None, env: dict[str, str] | None = None,
             log_to_driver: bool = False) -> str:
    """Connect to ``address`` (or ``RAY_ADDRESS``, or a running local cluster), else start a local Ray
    with ``job_cpus`` logical CPUs (default: the cores, at least 4 so stages can overlap on the OS's
    time). Returns "connected" or "started"; a no-op when this process is already connected."""
    import ray

    if ray.is_initialized():
        return "connected"
    runtime_env = {"env_vars": worker_env_vars(env)}
    common: dict = dict(logging_level="WARNING", log_to_driver=log_to_driver, runtime_env=runtime_env)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # a Ray job's driver: the job's runtime env (set by whoever submitted it) is the one that applies
        common.pop("runtime_env")
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, **common)
        return "connected"
    try:  # the cluster `serve run` (or `ray start`) runs on this machine: work where the server reads
        ray.init(address="auto", **common)
        return "connected"
    except ConnectionError:
        pass
    ray.init(num_cpus=job_cpus or max(4, os.cpu_count() or 1), include_dashboard=False, **common)
    return "started"


def connect_if_running(address: str | None = None) -> bool:
    """Connect to ``address`` or the cluster running on this machine; False (and no Ray started) if none."""
    import ray

    if ray.is_initialized():
        return True
    try:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR",
                 log_to_driver=False)
    except ConnectionError:
        if address:
            raise
        return False
    return True


def in_cluster(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a Ray worker on this node, waited for; its exception is raised here.

    Why: a Ray job's driver is started in a session of its own, and Linux's autogroup scheduling
    shares the CPU between sessions before it looks at niceness. Beside a busy server on 2 cores a
    job's driver was measured getting 2-3% of a core (a fine-tuning job's evaluation took 7 minutes),
    while a task in the cluster's own workers got 70%. The work goes where the cluster schedules it;
    the driver only waits. Stopping the job stops the task (a task dies with the driver that owns it).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray(log_to_driver=True)  # what the task prints is the job's log
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # 0 logical CPUs: the server holds them; the OS shares the cores (the stages it starts ask for theirs)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(fn)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None  # the task's own error (its traceback is in the job's log)
        raise


def free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


@dataclass(frozen=True)
class Demand:
    """``count`` workers (actors, tasks, Train workers) of a job's stage, ``cpus`` logical CPUs each."""

    name: str
    count: int
    cpus: float

    @property
    def total(self) -> float:
        return self.count * self.cpus


def fit(demands: list[Demand], free: float, share: ClusterShare = "fit") -> list[Demand]:
    """``demands`` scaled down, in proportion, to fit ``free`` logical CPUs (each at least ``MIN_CPUS``);
    unchanged when they fit, or when ``share`` is strict."""
    wanted = sum(d.total for d in demands)
    if share == "strict" or wanted <= free or wanted == 0:
        return list(demands)
    scale = max(free, 0.0) / wanted
    return [replace(d, cpus=max(MIN_CPUS, round(d.cpus * scale, 4)) if d.cpus > 0 else 0.0) for d in demands]


def share_cpus(job: str, demands: list[Demand], share: ClusterShare = "fit") -> dict[str, float]:
    """Per-worker CPUs of each stage, fitted to this cluster now; logs what was scaled and why."""
    free = free_cpus()
    fitted = fit(demands, free, share)
    if fitted != demands:
        logger.warning(
            "%s: the cluster has %.2f logical CPUs free (the rest is held by what already runs, e.g. the Serve "
            "app), the job asks for %.2f: its stages run with %s and share the cores with the server "
            "(`cluster_share: strict` keeps the requests and waits for CPUs instead)", job, free,
            sum(d.total for d in demands), ", ".join(f"{d.name} {d.count}x{d.cpus:g}" for d in fitted))
    return {d.name: d.cpus for d in fitted}
