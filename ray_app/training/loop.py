"""The per-worker training loop (Ray Train ``train_loop_per_worker``) for fine-tuning and distillation.

Each worker reads its shard of the token rows through Ray Data, trains with DDP (or DeepSpeed ZeRO),
and reports metrics every ``checkpoint.every_steps`` steps together with a checkpoint (rank 0 writes
the trainable weights, optimizer, scheduler and step). After a worker dies, Ray Train restarts the
group from the latest checkpoint, and the loop resumes at that step.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ray_app.training.config import DistillConfig, TrainConfig, TuneConfig
from ray_app.training.data import IGNORE


def _collate(batch: dict[str, np.ndarray], pad_id: int):
    from ray_app.training.data import collate

    rows = [{"input_ids": list(ids), "labels": list(labels)} for ids, labels in zip(batch["input_ids"], batch["labels"])]
    return collate(rows, pad_id)


def total_steps(config: TrainConfig, train_rows: int, world_size: int) -> int:
    if config.optim.max_steps:
        return config.optim.max_steps
    per_worker = math.ceil(train_rows / world_size)
    per_epoch = max(1, math.ceil(per_worker / config.optim.batch_size / config.optim.gradient_accumulation))
    return per_epoch * config.optim.epochs


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, kl_weight: float, ce_loss):
    """w * T^2 * KL(teacher || student) on the label positions + (1 - w) * cross-entropy."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != IGNORE  # logits at position t predict token t + 1
    s = student_logits[:, :-1][mask] / temperature
    t = teacher_logits[:, :-1][mask] / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl_weight * temperature ** 2 * kl + (1 - kl_weight) * ce_loss


class _Tracker:
    """Per-step metrics into the job's MLflow run, and into a fine-tuning job's events (rank 0 only)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, events_path: str | None = None):
        self.client = None
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.events = None
        if events_path:
            from ray_app.training.events import EventLog

            self.events = EventLog(events_path)

    def log(self, metrics: dict[str, float], step: int, total_steps: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        if self.events is not None:
            shown = {"step": step, "train_loss": round(metrics["loss"], 4),
                     "valid_loss": round(metrics["val_loss"], 4) if "val_loss" in metrics else None,
                     "tokens_per_s": round(metrics["tokens_per_s"], 1)}
            self.events.add(f"Step {step}/{total_steps}: training loss={shown['train_loss']}"
                            + (f", validation loss={shown['valid_loss']}" if shown["valid_loss"] is not None else ""),
                            data=shown, kind="metrics")
            self.events.add(f"Checkpoint saved at step {step}", kind="checkpoint",
                            data={"step": step, "metrics": {k: v for k, v in shown.items() if k != "step"},
                                  "checkpoint": f"step-{step}"})


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from ray_app.training.model import load_for_training, load_trainable_state, trainable_state

    config_cls = {c.__name__: c for c in (TrainConfig, DistillConfig, TuneConfig)}[loop_config["config_class"]]
    config = config_cls.model_validate(loop_config["config"])
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    if config.scaling.nice:
        # Ray's logical CPUs do not reach the OS scheduler; niceness does: the server beside us goes first
        os.nice(max(0, config.scaling.nice - os.nice(0)))
    torch.manual_seed(config.optim.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.scaling.use_gpu else torch.device("cpu")
    pad_id = loop_config["pad_id"]

    model = load_for_training(loop_config["model_path"], config.method, config.lora, str(device))
    teacher = None
    if loop_config.get("teacher_path"):
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(loop_config["teacher_path"], dtype=torch.float32).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    steps = loop_config["total_steps"]
    start_step, restored = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            restored = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
        load_trainable_state(model, restored["model"])
        start_step = restored["step"]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)
    warmup = config.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * max(0.0, 1 - s / max(steps, 1)))
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])

    engine = None
    if config.deepspeed.stage:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if config.scaling.use_gpu else "gloo")
        zero: dict[str, Any] = {"stage": config.deepspeed.stage}
        if config.deepspeed.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config={
            "train_micro_batch_size_per_gpu": config.optim.batch_size,
            "gradient_accumulation_steps": config.optim.gradient_accumulation,
            "gradient_clipping": config.optim.max_grad_norm, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30})
        module = engine
    else:
        module = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None) \
            if config.method != "qlora" else model

    tracker = (_Tracker(loop_config.get("tracking_uri"), loop_config.get("run_id"), loop_config.get("events_path"))
               if rank == 0 else _Tracker(None, None))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    accum = config.optim.gradient_accumulation
    distill = config.distill if teacher is not None else None

    def forward_loss(batch) -> tuple[Any, int]:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = module(**batch)
        loss = out.loss
        if distill is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = distillation_loss(out.logits, teacher_logits, batch["labels"], distill.temperature,
                                     distill.kl_weight, out.loss)
        return loss, int((batch["labels"] != IGNORE).sum())

    def all_sum(values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def validate() -> dict[str, float]:
        module.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for batch in val_shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy"):
                batch = {k: v.to(device) for k, v in _collate(batch, pad_id).items()}
                out = module(**batch)
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                loss_sum += float(out.loss) * n
                tokens += n
        module.train()
        loss_sum, tokens = all_sum([loss_sum, tokens])
        if not tokens:
            return {}
        return {"val_loss": loss_sum / tokens, "val_perplexity": math.exp(min(loss_sum / tokens, 50))}

    def save_and_report(metrics: dict[str, float], step: int) -> None:
        state = None
        if config.deepspeed.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().clone() for k, v in trainable_state(model).items()}
        if rank == 0:
            from ray_app.metrics import record_train_step

            tracker.log(metrics, step, steps)
            record_train_step(context.get_experiment_name(), step, metrics["loss"], metrics["tokens_per_s"])
            print(f"[train] step {step}/{steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"model": state or trainable_state(model), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "step": step}, Path(folder) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    module.train()
    step, micro, seen = start_step, 0, 0
    window_loss, window_batches, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    skip = start_step * accum  # micro-batches already trained on before the restart
    epoch = 0
    while step < steps:
        for batch in train_shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy",
                                              local_shuffle_buffer_size=None):
            if seen < skip:
                seen += 1
                continue
            seen += 1
            loss, _ = forward_loss(_collate(batch, pad_id))
            window_tokens += int(batch_tokens(batch))
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                (loss / accum).backward()
            micro += 1
            window_loss += float(loss.detach())
            window_batches += 1
            if micro % accum:
                continue
            if engine is None:
                torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.checkpoint.every_steps == 0 or step == steps:
                seconds = time.perf_counter() - window_start
                loss_avg, tokens_all = all_sum([window_loss / max(window_batches, 1), window_tokens])
                metrics = {"step": step, "epoch": epoch, "loss": loss_avg / world,
                           "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": tokens_all / seconds,
                           "resumed_from_step": start_step}
                metrics |= validate()
                save_and_report(metrics, step)
                window_loss, window_batches, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            if step >= steps:
                break
        epoch += 1
        if seen == 0:
            raise RuntimeError(f"worker {rank} received no training rows")


def batch_tokens(batch: dict[str, np.ndarray]) -> int:
    return sum(len(ids) for ids in batch["input_ids"])


def worker_env(config: TrainConfig) -> dict[str, str]:
    """What the workers need on top of the driver's ``cluster.worker_env_vars``."""
    if config.deepspeed.stage and not config.scaling.use_gpu:
        return {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(config.paths.root / "torch_extensions")}
    return {}
