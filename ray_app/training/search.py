"""Hyperparameter search with Ray Tune: learning rate, LoRA rank, alpha and dropout, ASHA early
stopping. Each trial is a full ``run_training`` (its own Ray Train run and MLflow run, not registered);
Train's reports reach Tune through ``TuneReportCallback``. The best trial is registered."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ray_app.training.config import TuneConfig
from ray_app.cluster import init_ray
from ray_app.training.finetune import run_training, template_hash


@dataclass
class SearchResult:
    best_params: dict
    best_metric: float
    best_run_id: str
    version: int | None
    trials: list[dict]


def _trial_config(config: TuneConfig, params: dict) -> TuneConfig:
    data = config.model_dump()
    data["optim"]["learning_rate"] = params["learning_rate"]
    data["lora"] |= {"r": params["r"], "alpha": params["alpha"], "dropout": params["dropout"]}
    return TuneConfig.model_validate(data)


def run_search(config: TuneConfig) -> SearchResult:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler

    from ray_app.training.registry import AdapterRegistry

    space = config.tune.space
    param_space = {"learning_rate": tune.loguniform(*space.learning_rate), "r": tune.choice(space.r),
                   "alpha": tune.choice(space.alpha), "dropout": tune.uniform(*space.dropout)}

    def trainable(params: dict) -> None:
        trial = _trial_config(config, params)
        result = run_training(trial, register=False, run_name=f"{config.name}-{tune.get_context().get_trial_name()}",
                              tune_callbacks=[TuneReportCallback()])
        # the last report carries what registration needs: the MLflow run, its evaluation and parity
        tune.report({config.tune.metric: result.metrics.get(config.tune.metric, float("inf")),
                     "run_id": result.run_id, "parity": result.parity, **result.eval})

    init_ray()
    # ASHA counts reports: one per checkpoint interval, plus the trial's final one
    reports = math.ceil((config.optim.max_steps or 10_000) / config.checkpoint.every_steps) + 1
    tuner = tune.Tuner(
        # the trial only drives its TorchTrainer, whose workers hold the CPUs
        tune.with_resources(trainable, {"cpu": 0.01}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=config.tune.metric, mode="min", num_samples=config.tune.num_samples,
            max_concurrent_trials=config.tune.max_concurrent,
            scheduler=ASHAScheduler(max_t=reports, grace_period=config.tune.grace_period,
                                    reduction_factor=config.tune.reduction_factor)),
        run_config=tune.RunConfig(name=f"{config.name}-search", storage_path=str(config.paths.root / "tune_runs")),
    )
    grid = tuner.fit()
    finished = [r for r in grid if r.metrics and "run_id" in r.metrics]
    if not finished:
        raise RuntimeError(f"no trial finished: {[str(r.error) for r in grid if r.error]}")
    best = min(finished, key=lambda r: r.metrics[config.tune.metric])
    trials = [{"params": r.config, config.tune.metric: (r.metrics or {}).get(config.tune.metric),
               "finished": r in finished, "iterations": (r.metrics or {}).get("training_iteration")} for r in grid]
    version = None
    if config.tracking.register_model:
        from mlflow.tracking import MlflowClient

        from ray_app.models.resolve import resolve_source
        from ray_app.training.model import load_tokenizer

        run = MlflowClient(config.tracking_uri).get_run(best.metrics["run_id"])

        tokenizer = load_tokenizer(resolve_source(config.base_model, config.paths), config.data.chat_template)
        tags = {"base_model": config.base_model, "base_serve_name": config.base_serve_name, "method": config.method,
                "dataset_sha256": run.data.params.get("dataset_sha256", ""),
                "chat_template_sha256": template_hash(tokenizer), "parity": best.metrics["parity"],
                "tune_params": str(best.config),
                **{k: f"{v:.5g}" for k, v in best.metrics.items() if k.startswith(("base_", "adapter_"))}}
        version = AdapterRegistry(config.tracking_uri).register(
            config.name, run.info.run_id, f"{run.info.artifact_uri}/adapter", tags).version
    return SearchResult(best.config, best.metrics[config.tune.metric], best.metrics["run_id"], version, trials)
