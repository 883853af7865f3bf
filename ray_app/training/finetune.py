"""The driver side of a training job: data on the driver, Ray Train for the loop, then evaluation,
the parity check and registration in MLflow. ``jobs/finetune.py`` and ``jobs/distill.py`` call
``run_training``; ``jobs/tune.py`` runs it once per trial and registers the best."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_app.cluster import init_ray, worker_env_vars
from ray_app.training.config import DistillConfig, TrainConfig
from ray_app.training.data import TokenizedData, prepare
from ray_app.training.model import load_tokenizer

logger = logging.getLogger("ray_app.train")
GOLDEN_PROMPTS = "golden_prompts.json"


@dataclass
class TrainingResult:
    run_id: str | None
    artifact: Path  # the adapter (or full model) folder
    metrics: dict[str, float]
    eval: dict[str, float] = field(default_factory=dict)
    parity: str = "skipped"
    version: int | None = None
    resumed_from_steps: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)  # every report of rank 0, in order
    trained_tokens: int = 0


def fit_scaling(config: TrainConfig) -> TrainConfig:
    """The config with its workers' CPU requests fitted to what the cluster has free (``cluster_share``)."""
    from ray_app.cluster import Demand, share_cpus

    scaling = config.scaling
    fitted = share_cpus(f"training {config.name}", [Demand("worker", scaling.num_workers, scaling.cpus_per_worker)],
                        config.cluster_share)["worker"]
    if fitted == scaling.cpus_per_worker:
        return config
    return config.model_copy(update={"scaling": scaling.model_copy(update={"cpus_per_worker": fitted})})


def template_hash(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]


def check_distillation_pair(student_tokenizer, teacher_tokenizer) -> None:
    """Logits can only be compared token for token: the vocabularies must be identical."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError("teacher and student tokenizers differ (vocabulary); distillation compares logits "
                         "token by token, so both must share one tokenizer")


def build_trainer(config: TrainConfig, data: TokenizedData, loop_config: dict[str, Any], run_name: str,
                  callbacks: list | None = None):
    import ray.data
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_app.training.loop import train_loop_per_worker, worker_env

    resources = {"CPU": config.scaling.cpus_per_worker, **config.scaling.resources_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = 1
    DataContext.get_current().enable_progress_bars = False  # the loop prints its own progress per report
    datasets = {"train": ray.data.from_items(data.train),
                "validation": ray.data.from_items(data.validation or data.train[:1])}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=str(config.paths.root / "train_runs"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            worker_runtime_env={"env_vars": worker_env_vars(worker_env(config))},
            callbacks=callbacks,
        ),
        datasets=datasets,
    )


def _artifact_from_checkpoint(config: TrainConfig, model_path: str, tokenizer, checkpoint, out: Path) -> Path:
    import torch

    from ray_app.training.model import load_for_training, load_trainable_state, save_artifact

    method = "lora" if config.method == "qlora" else config.method  # the adapter serves on the full-precision base
    model = load_for_training(model_path, method, config.lora)
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
    load_trainable_state(model, state["model"])
    return save_artifact(model, tokenizer, out)


def run_training(config: TrainConfig, *, register: bool | None = None, run_name: str | None = None,
                 serve_model_path: str | None = None, tune_callbacks: list | None = None,
                 evaluate_result: bool = True, events: Any = None) -> TrainingResult:
    """Train, evaluate (base vs. adapter), check parity and register. Raises ``DatasetError`` before
    any worker starts when the data cannot be trained on. ``events`` (a fine-tuning job's
    ``EventLog``) gets what happens, step by step."""

    def say(message: str, **data: Any) -> None:
        if events is not None:
            events.add(message, data=data)
    import mlflow

    from ray_app.models.resolve import resolve_source
    from ray_app.training.evaluate import base_against_adapter, parity_check, tokenizer_tokens
    from ray_app.training.loop import total_steps
    from ray_app.training.registry import AdapterRegistry, ensure_experiment

    paths = config.paths
    model_path = resolve_source(config.base_model, paths)
    tokenizer = load_tokenizer(model_path, config.data.chat_template)
    data = prepare(tokenizer, config.data.train, config.data.validation, config.data.validation_fraction,
                   config.data.max_seq_len, config.data.packing, config.data.seed)
    for problem in data.problems:
        logger.warning("skipped %s", problem)
    print(f"[data] {len(data.train)} training rows ({data.train_tokens} tokens), {len(data.validation)} held out, "
          f"{len(data.problems)} bad lines skipped, {data.truncated} truncated to {config.data.max_seq_len} tokens",
          flush=True)
    say(f"Training data: {len(data.train)} rows ({data.train_tokens} tokens), {len(data.validation)} held out, "
        f"{len(data.problems)} bad lines skipped", train_rows=len(data.train), train_tokens=data.train_tokens)
    teacher_path = None
    if isinstance(config, DistillConfig):
        teacher_path = resolve_source(config.distill.teacher, paths)
        check_distillation_pair(tokenizer, load_tokenizer(teacher_path))

    run_name = run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = config.tracking_uri
    experiment_id = ensure_experiment(tracking_uri, config.tracking.experiment, paths.root / "mlflow" / "artifacts")
    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    try:
        mlflow.log_params({"base_model": config.base_model, "method": config.method, "lora_r": config.lora.r,
                           "lora_alpha": config.lora.alpha, "lora_dropout": config.lora.dropout,
                           "learning_rate": config.optim.learning_rate, "batch_size": config.optim.batch_size,
                           "num_workers": config.scaling.num_workers, "deepspeed_stage": config.deepspeed.stage,
                           "max_seq_len": config.data.max_seq_len, "packing": config.data.packing,
                           "train_rows": len(data.train), "dataset_sha256": data.sha256})
        mlflow.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")
        if data.problems:
            mlflow.log_text("\n".join(map(str, data.problems)), "data_problems.txt")

        init_ray()  # the server's cluster when one runs, else a local Ray of its own
        config = fit_scaling(config)
        steps = total_steps(config, len(data.train), config.scaling.num_workers)
        loop_config = {"config": config.model_dump(mode="json"), "config_class": type(config).__name__,
                       "model_path": model_path, "teacher_path": teacher_path,
                       "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                       "total_steps": steps, "tracking_uri": tracking_uri, "run_id": run.info.run_id,
                       "events_path": str(events.path) if events is not None else None}
        say(f"Training {steps} steps on {config.scaling.num_workers} Ray Train worker(s) "
            f"({config.scaling.cpus_per_worker:g} CPU each)", total_steps=steps)
        result = build_trainer(config, data, loop_config, run_name, tune_callbacks).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training ended without a checkpoint: {result.error}")
        metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None else []
        resumed = sorted({int(row["resumed_from_step"]) for row in history if row.get("resumed_from_step")})

        out = paths.root / "adapters" / config.name / run.info.run_id
        artifact = _artifact_from_checkpoint(config, model_path, tokenizer, result.checkpoint, out)
        # promotion re-checks parity against a live endpoint with the same prompts
        (artifact / GOLDEN_PROMPTS).write_text(json.dumps(config.eval.golden_prompts))
        examples_seen = steps * config.optim.batch_size * config.optim.gradient_accumulation * config.scaling.num_workers
        outcome = TrainingResult(run.info.run_id, artifact, metrics, resumed_from_steps=resumed, history=history,
                                 trained_tokens=int(data.train_tokens * examples_seen / max(len(data.train), 1)))
        if evaluate_result:
            if config.scaling.torch_threads:  # as the workers: more threads than free cores spin, and crawl
                import torch

                torch.set_num_threads(config.scaling.torch_threads)
            scores = base_against_adapter(model_path, str(artifact), tokenizer, data.validation,
                                          data.validation_conversations, config.eval.metric,
                                          config.eval.max_examples, config.eval.max_new_tokens)
            outcome.eval = scores
            mlflow.log_metrics(scores)
            parity = parity_check(load_tokenizer(str(artifact)), tokenizer_tokens(serve_model_path or model_path,
                                                                            config.data.chat_template),
                                  config.eval.golden_prompts)
            outcome.parity = "passed" if parity.passed else "failed"
            mlflow.log_text(json.dumps({"passed": parity.passed, "mismatches": parity.mismatches}, indent=2), "parity.json")
            print(f"[eval] {json.dumps(scores)}; {parity.summary()}", flush=True)
            say("Evaluation on the held-out examples: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.items()),
                **scores)
            say(f"Train->serve parity check: {outcome.parity}", parity=outcome.parity)
        mlflow.log_artifacts(str(artifact), "adapter")
        if register if register is not None else config.tracking.register_model:
            registry = AdapterRegistry(tracking_uri)
            version = registry.register(config.name, run.info.run_id, f"{run.info.artifact_uri}/adapter", tags={
                "base_model": config.base_model, "base_serve_name": config.base_serve_name, "method": config.method,
                "dataset_sha256": data.sha256, "chat_template_sha256": template_hash(tokenizer),
                "parity": outcome.parity, "parity_detail": "golden prompts: " + str(len(config.eval.golden_prompts)),
                **{k: f"{v:.5g}" for k, v in outcome.eval.items()},
            })
            outcome.version = version.version
            print(f"[registry] {config.name} version {version.version} registered (parity {outcome.parity})", flush=True)
            say(f"Registered {config.name} version {version.version} in the MLflow registry", version=version.version)
        return outcome
    finally:
        mlflow.end_run()


