"""Typed configuration of training jobs: fine-tuning (LoRA, DoRA, QLoRA, full), distillation and
hyperparameter search. One YAML file per job under ``configs/train/``; every field is documented here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from ray_app.cluster import ClusterShare
from ray_app.paths import DataDir
from ray_app.schema import Strict, load_yaml, parse


class DataConfig(Strict):
    train: str = Field(description="JSONL: OpenAI chat format ({'messages': [...]}) or instruction/input/output.")
    validation: str | None = Field(None, description="Held-out JSONL; default: a fraction of `train`.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of `train` held out when no `validation`.")
    max_seq_len: PositiveInt = Field(512, description="Longer examples are truncated (and reported).")
    packing: bool = Field(False, description="Concatenate examples into full max_seq_len blocks.")
    seed: int = 0
    chat_template: str | None = Field(
        None, description="Render with this template instead of the base model's: a shipped one by name "
                          "(smollm2-tools, the template SmolLM2 is served with for tool calling) or a .jinja file. "
                          "Set it to the served model's `tools.chat_template` to train on tool-calling data.")

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        from ray_app.templates import shipped, template_path

        if value is not None and not template_path(value).is_file():
            raise ValueError(f"{value!r}: no such file and not a shipped template ({', '.join(shipped())})")
        return value


class LoraSettings(Strict):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class OptimConfig(Strict):
    learning_rate: PositiveFloat = 2e-4
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: PositiveInt = Field(4, description="Examples per worker per step.")
    gradient_accumulation: PositiveInt = 1
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: PositiveFloat = 1.0
    seed: int = 0


class ScalingSettings(Strict):
    num_workers: PositiveInt = Field(2, description="Ray Train workers (one process each; DDP across them).")
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1
    torch_threads: PositiveInt | None = Field(1, description="torch threads per worker (1 was fastest on 2 cores).")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Extra custom resources.")
    nice: int = Field(0, ge=0, le=19, description="OS niceness of the worker processes: above 0 a server "
                                                  "sharing the cores gets them first.")


class DeepSpeedSettings(Strict):
    stage: Literal[0, 2, 3] = Field(0, description="ZeRO stage; 0 = plain DDP.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU memory.")


class CheckpointSettings(Strict):
    every_steps: PositiveInt = Field(10, description="Report a checkpoint (adapter + optimizer) every N steps.")
    keep: PositiveInt = Field(2, description="Checkpoints kept per run.")


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite:///<data_dir>/mlflow/mlflow.db (a server URL for teams).")
    experiment: str = "ray_app"
    register_model: bool = Field(True, description="Register the trained adapter as a new model version.")


class EvalConfig(Strict):
    max_examples: PositiveInt = Field(16, description="Held-out examples generated for the task score.")
    max_new_tokens: PositiveInt = 48
    metric: Literal["rouge_l", "exact_match"] = "rouge_l"
    golden_prompts: list[str] = Field(
        default_factory=lambda: ["What is Ray?", "Summarise: the meeting moved to Tuesday."],
        description="Prompts whose tokens must match between training and serving (the parity check).")


class TrainConfig(Strict):
    """A fine-tuning job: ``jobs/finetune.py --config configs/train/<job>.yaml``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Adapter line: the registered model's name and what clients put after `base:`.")
    base_model: str = Field(description="A prepared model name, a folder or a Hugging Face id.")
    serve_name: str | None = Field(None, description="The served model id of the base (default: base_model).")
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    data: DataConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    max_failures: int = Field(2, ge=-1, description="Worker failures survived by resuming from the last checkpoint.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster_share: ClusterShare = Field(
        "fit", description="fit: scale the workers' CPU requests to what the cluster has free (a laptop that also "
                           "serves); strict: keep them and wait (a cluster that autoscales).")
    data_dir: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.method == "qlora" and self.deepspeed.stage:
            raise ValueError("qlora with deepspeed is not supported: use lora with ZeRO, or qlora with DDP")
        if self.method == "full" and self.lora != LoraSettings():
            raise ValueError("`lora` settings are for lora/dora/qlora, not method: full")
        return self

    @property
    def paths(self) -> DataDir:
        return DataDir.from_path(self.data_dir)

    @property
    def tracking_uri(self) -> str:
        return self.tracking.tracking_uri or self.paths.mlflow_uri

    @property
    def base_serve_name(self) -> str:
        return self.serve_name or self.base_model

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None):
        data = load_yaml(path)
        for dotted, value in (overrides or {}).items():
            target = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                target = target.setdefault(key, {})
            target[leaf] = value
        return parse(cls, data, str(path))


class DistillSettings(Strict):
    teacher: str = Field(description="The teacher model: a prepared name, folder or Hugging Face id.")
    temperature: PositiveFloat = Field(2.0, description="Softmax temperature of the KL term.")
    kl_weight: float = Field(0.5, ge=0, le=1, description="loss = w * T^2 * KL(teacher || student) + (1 - w) * CE.")


class DistillConfig(TrainConfig):
    """Knowledge distillation: ``jobs/distill.py``; the student is ``base_model`` (LoRA or full)."""

    distill: DistillSettings


class SearchSpace(Strict):
    learning_rate: tuple[PositiveFloat, PositiveFloat] = Field((5e-5, 1e-3), description="log-uniform range")
    r: list[PositiveInt] = Field(default_factory=lambda: [4, 8, 16])
    alpha: list[PositiveFloat] = Field(default_factory=lambda: [8, 16, 32])
    dropout: tuple[float, float] = Field((0.0, 0.1), description="uniform range")


class TuneSettings(Strict):
    num_samples: PositiveInt = 8
    max_concurrent: PositiveInt = 1
    metric: str = "val_loss"
    grace_period: PositiveInt = Field(1, description="ASHA: reports before a trial can be stopped.")
    reduction_factor: PositiveInt = 2
    space: SearchSpace = Field(default_factory=SearchSpace)


class TuneConfig(TrainConfig):
    """A Ray Tune search over LoRA hyperparameters: ``jobs/tune.py``; the best trial is registered."""

    tune: TuneSettings = Field(default_factory=TuneSettings)
