"""The vLLM replica deployments, built on Ray's own ``ray.serve.llm`` (``LLMConfig`` + ``LLMServer``).

Ray Serve LLM brings the engine lifecycle, multi-LoRA multiplexing, autoscaling and engine metrics;
this module translates our typed ``LLMConfigModel`` into its ``LLMConfig``, adds a read-only method to
its server, and places the replica's processes on the machine (cores, priority) once the engine runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from ray_app.serve.config import AdapterServeSettings, LLMConfigModel

DEPLOYMENT_PREFIX = "LLM:"
logger = logging.getLogger("ray_app.llm")


class LLMDeployment(LLMServer):
    """``LLMServer`` plus adapters from our catalog and what the gateway's status and tests read."""

    async def __init__(self, llm_config: LLMConfig, *, adapters: dict | None = None, data_dir: str | None = None,
                       **kwargs):
        if adapters is not None:
            from ray_app.serve.adapters import adapter_loader_class, catalog_for

            catalog = catalog_for(llm_config.model_id, AdapterServeSettings.model_validate(adapters), data_dir)
            kwargs["model_downloader"] = adapter_loader_class(catalog)
        await super().__init__(llm_config, **kwargs)
        if (cores := keep_off_engine_cores()) is not None:
            logger.info("this replica's threads run on cores %s, off the CPU engine's worker", sorted(cores))
        run_at_cluster_priority()

    async def num_unfinished_requests(self) -> int:
        # Requests the engine still holds (running or waiting): what an abort must bring back to 0.
        from ray_app.serve.internals import engine_unfinished_requests

        return engine_unfinished_requests(self)


def cores_off_engine(own: set[int], engine: set[int]) -> set[int] | None:
    """The cores this process should keep to: its own minus the engine worker's, if any remain."""
    rest = own - engine
    return rest if engine and rest and rest != own else None


def keep_off_engine_cores() -> set[int] | None:
    """Move this replica's threads (HTTP, the gateway, detokenizing) off the cores vLLM's CPU worker is
    bound to. vLLM binds the worker's OpenMP threads to cores (``VLLM_CPU_OMP_THREADS_BIND=auto``) and
    leaves the rest to its scheduler and the frontend; a thread of ours woken on the worker's core
    preempts a forward pass. Measured on 2 cores, SmolLM2 without LoRA, 32 clients, 3 rounds against
    ``vllm serve``: 0.86-1.01x unpinned, 0.97-1.06x pinned. A GPU worker is bound to no core: nothing moves."""
    import psutil

    me = psutil.Process()
    engine = {core for child in me.children(recursive=True) if child.name() == "VLLM::Worker"
              for core in child.cpu_affinity()}
    cores = cores_off_engine(set(me.cpu_affinity()), engine)
    if cores is not None:
        for thread in me.threads():  # threads started later inherit their creator's cores
            os.sched_setaffinity(thread.id, cores)
    return cores


def run_at_cluster_priority() -> None:
    """Run this replica and the engine processes it started at the cluster's own niceness (the raylet's),
    not at the 15 Ray starts its workers with. At 15 the engine gives its cores away to anything at 0 on
    the machine (a client, a browser), which ``vllm serve`` does not: measured on 2 cores, 32 clients,
    5 rounds of the same server reniced in turn against ``vllm serve``, 0.982x at 15 and 1.013x at 0,
    better in every round. Background work stays behind it: ingest and training run in Ray's workers at
    15. Lowering niceness needs CAP_SYS_NICE (or RLIMIT_NICE); without it the replica keeps Ray's."""
    import psutil

    me = psutil.Process()
    parent = me.parent()
    if parent is None or parent.name() != "raylet" or me.nice() <= parent.nice():
        return
    if set_niceness([me, *me.children(recursive=True)], parent.nice()):
        logger.info("this replica and its engine run at niceness %d, the cluster's", parent.nice())
    else:
        logger.info("this replica keeps Ray's worker niceness %d: lowering it needs CAP_SYS_NICE", me.nice())


def set_niceness(processes, nice: int) -> bool:
    """Every thread of ``processes`` at ``nice`` (Linux keeps niceness per thread, and a thread starts
    at its creator's); False if the OS refused."""
    import psutil

    for proc in processes:
        try:
            threads = proc.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, thread.id, nice)
            except ProcessLookupError:  # the thread ended
                continue
            except PermissionError:
                return False
    return True


def to_llm_config(model: LLMConfigModel, model_path: str) -> LLMConfig:
    engine_kwargs: dict[str, Any] = dict(model.engine_kwargs)
    lora_config = None
    if model.adapters is not None:
        engine_kwargs |= {"enable_lora": True, "max_loras": model.adapters.max_per_replica,
                          "max_lora_rank": model.adapters.max_rank}
        lora_config = {"max_num_adapters_per_replica": model.adapters.max_per_replica}
    if model.tools is not None:
        engine_kwargs |= model.tools.engine_kwargs()
    if model.accelerator == "cpu":
        bundle: dict[str, float] = {"CPU": model.engine_cpus}
    else:
        bundle = {"CPU": model.engine_cpus, "GPU": 1}
    return LLMConfig(
        model_loading_config={"model_id": model.name, "model_source": model_path},
        accelerator_config={"kind": model.accelerator},
        accelerator_type=model.accelerator_type,
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundle_per_worker": bundle},
        deployment_config=model.replicas.serve_options(),
        runtime_env={"env_vars": model.engine_env()},
        log_engine_metrics=True,
        lora_config=lora_config,
        experimental_configs=(
            {} if model.stream_batching_interval_ms is None
            else {"stream_batching_interval_ms": model.stream_batching_interval_ms}
        ),
    )


def build_llm_app(model: LLMConfigModel, model_path: str, data_dir: str,
                  deployment_cls: type[LLMDeployment] = LLMDeployment, **bind_kwargs):
    """The bound ``LLMDeployment`` (or a subclass of it) for one configured model, named ``LLM:<name>``
    in the dashboard; ``bind_kwargs`` go to the subclass."""
    if model.adapters:
        bind_kwargs |= {"adapters": model.adapters.model_dump(), "data_dir": data_dir}
    return build_llm_deployment(
        to_llm_config(model, model_path),
        name_prefix=DEPLOYMENT_PREFIX,
        deployment_cls=deployment_cls,
        bind_kwargs=bind_kwargs,
    )
