"""Training end to end on the session's real Ray cluster: Ray Train with 2 CPU workers on the tiny
model (LoRA, DoRA, QLoRA, DeepSpeed ZeRO-2), a worker killed mid-run, distillation, a 2-trial Tune
search, the MLflow registry on sqlite, and an adapter promoted and rolled back while Serve runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from ray_app.training.config import DistillConfig, TrainConfig, TuneConfig
from ray_app.training.finetune import run_training

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "system", "content": "You are the ray_app support assistant."},
          {"role": "user", "content": "How do I reset my password?"}]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, data_dir, mlflow_uri) -> dict:
    """A fresh data directory (sharing the prepared models) and the session's MLflow store."""
    data = tmp_path_factory.mktemp("train-data")
    (data / "models").symlink_to(data_dir.models)
    return {"data_dir": str(data), "tracking.tracking_uri": mlflow_uri,
            "data.train": str(ROOT / "configs/train/data/support.jsonl")}


def load(cls, file: str, overrides: dict, **more):
    return cls.load(ROOT / "configs" / "train" / file, overrides | more)


@pytest.fixture(scope="module")
def trained(ray_cluster, overrides):
    return run_training(load(TrainConfig, "lora_tiny.yaml", overrides))


def generate(model_path: str, adapter: str | None) -> str:
    from transformers import AutoTokenizer

    from ray_app.training.data import Conversation
    from ray_app.training.evaluate import generate_answers
    from ray_app.training.model import load_adapted

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    conversation = Conversation(PROMPT + [{"role": "assistant", "content": ""}])
    return generate_answers(load_adapted(model_path, adapter), tokenizer, [conversation], 12)[0]


def test_lora_lowers_the_loss_and_changes_what_the_model_says(trained, data_dir):
    assert trained.version == 1 and trained.parity == "passed"
    assert trained.metrics["step"] == 12 and trained.resumed_from_steps == []
    assert trained.eval["adapter_loss"] < trained.eval["base_loss"] - 1.0, trained.eval
    assert trained.eval["adapter_task_score"] > trained.eval["base_task_score"]
    assert (trained.artifact / "adapter_config.json").is_file()
    base = str(data_dir.model("tiny-llama"))
    assert generate(base, str(trained.artifact)) != generate(base, None)


def test_the_run_is_tracked_and_registered(trained, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from ray_app.training.registry import AdapterRegistry

    client = MlflowClient(mlflow_uri)
    run = client.get_run(trained.run_id)
    assert run.data.params["method"] == "lora" and run.data.params["lora_r"] == "16"
    losses = client.get_metric_history(trained.run_id, "loss")
    assert [m.step for m in losses] == [4, 8, 12] and losses[-1].value < losses[0].value
    assert {"adapter_loss", "base_loss", "adapter_task_score"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(trained.run_id)}
    assert {"adapter", "config.yaml", "parity.json"} <= artifacts
    version = AdapterRegistry(mlflow_uri).get("tiny-support", "1")
    assert version.tags["base_serve_name"] == "tiny-llama" and version.tags["parity"] == "passed"
    assert len(version.tags["dataset_sha256"]) == 64 and version.tags["chat_template_sha256"]
    assert float(version.tags["adapter_loss"]) == pytest.approx(trained.eval["adapter_loss"], rel=1e-3)


def test_a_killed_worker_resumes_from_the_latest_checkpoint(ray_cluster, overrides):
    import ray.util.state

    config = load(TrainConfig, "lora_tiny.yaml", overrides, **{"name": "tiny-resume", "optim.max_steps": 16,
                                                              "optim.learning_rate": 0.01})
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault(
        "result", run_training(config, register=False, evaluate_result=False, run_name="resume-test")))
    thread.start()
    runs = Path(overrides["data_dir"]) / "train_runs" / "resume-test"
    snapshot = runs / "checkpoint_manager_snapshot.json"  # written once Train has registered a checkpoint
    deadline = time.monotonic() + 240
    while not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert snapshot.is_file(), "no checkpoint was registered"
    workers = [a for a in ray.util.state.list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    thread.join(timeout=400)
    result = outcome["result"]
    assert result.metrics["step"] == 16
    assert result.resumed_from_steps and min(result.resumed_from_steps) >= 4, result.resumed_from_steps


@pytest.mark.parametrize("method,extra", [("dora", {}), ("qlora", {}), ("lora", {"deepspeed.stage": 2})],
                         ids=["dora", "qlora", "deepspeed-zero2"])
def test_methods(ray_cluster, overrides, method, extra):
    config = load(TrainConfig, "lora_tiny.yaml", overrides, **{"method": method, "name": f"tiny-{method}",
                                                              "optim.max_steps": 2, "checkpoint.every_steps": 1, **extra})
    result = run_training(config, register=False, evaluate_result=False)
    assert result.metrics["step"] == 2 and result.metrics["val_loss"] < 13
    adapter = json.loads((result.artifact / "adapter_config.json").read_text())
    assert adapter["use_dora"] is (method == "dora") and adapter["r"] == 16


def test_a_tool_calling_file_trains_with_the_template_the_model_is_served_with(ray_cluster, overrides):
    from ray_app.templates import template_path

    config = load(TrainConfig, "lora_tiny.yaml", overrides, **{
        "name": "tiny-tools", "data.train": str(ROOT / "configs/train/data/tools.jsonl"),
        "data.chat_template": "smollm2-tools", "data.max_seq_len": 512, "optim.max_steps": 6,
        "checkpoint.every_steps": 3})
    result = run_training(config, register=False)
    assert result.metrics["step"] == 6
    assert result.eval["adapter_loss"] < result.eval["base_loss"], result.eval
    # the adapter carries the template it learned with, and the prompts render as the server renders them
    assert result.parity == "passed"
    saved = result.artifact / "chat_template.jinja"
    assert saved.read_text().strip() == template_path("smollm2-tools").read_text().strip()


def _where(fail: bool) -> tuple[int, int]:
    if fail:
        from ray_app.training.data import DatasetError

        raise DatasetError("line 3: no assistant message")
    import ray

    return os.getpid(), ray.get_runtime_context().get_task_id() is not None


def test_a_jobs_work_runs_in_the_clusters_workers_and_its_errors_arrive_unwrapped(ray_cluster):
    from ray_app.cluster import in_cluster
    from ray_app.training.data import DatasetError

    pid, in_a_task = in_cluster(_where, False)
    assert pid != os.getpid() and in_a_task  # a Ray worker's task, not this process
    with pytest.raises(DatasetError) as failure:
        in_cluster(_where, True)
    assert type(failure.value) is DatasetError and str(failure.value) == "line 3: no assistant message"


def test_distillation_from_smollm2(ray_cluster, overrides):
    config = load(DistillConfig, "distill_tiny.yaml", overrides, **{"optim.max_steps": 2, "checkpoint.every_steps": 2})
    result = run_training(config, register=False, evaluate_result=False)
    assert result.metrics["step"] == 2 and result.metrics["loss"] > 0


def test_tune_runs_trials_and_registers_the_best(ray_cluster, overrides, mlflow_uri):
    from ray_app.training.registry import AdapterRegistry
    from ray_app.training.search import run_search

    config = load(TuneConfig, "tune_tiny.yaml", overrides, **{"tune.num_samples": 2, "optim.max_steps": 4})
    result = run_search(config)
    assert len(result.trials) == 2
    finished = [t["val_loss"] for t in result.trials if t["finished"]]
    assert result.best_metric == min(finished)
    version = AdapterRegistry(mlflow_uri).get("tiny-tuned", str(result.version))
    assert version.tags["base_serve_name"] == "tiny-llama" and "learning_rate" in version.tags["tune_params"]


def ray_app_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "ray-app"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def ask(client, model: str) -> str:
    return client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0).choices[0].message.content


def test_an_adapter_is_served_promoted_and_rolled_back_without_restart(served, trained, mlflow_uri, overrides):
    from ray_app.training.registry import AdapterRegistry

    client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError, match="champion"):  # trained and registered, not promoted yet
        ask(client, "tiny-llama:tiny-support")

    promoted = ray_app_cli("adapters", "promote", "tiny-support", "1", "--registry", mlflow_uri, "--endpoint", served.v1)
    assert promoted.returncode == 0, promoted.stderr
    assert "parity passed" in promoted.stderr
    base_answer = ask(client, "tiny-llama")
    v1_answer = ask(client, "tiny-llama:tiny-support")
    assert v1_answer != base_answer
    assert v1_answer == ask(client, "tiny-llama:tiny-support@1")
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny-llama:tiny-support"].model_extra["parent"] == "tiny-llama"

    # a second version with other weights: promoted, it answers at once; rolled back, v1 is back
    second = run_training(load(TrainConfig, "lora_tiny.yaml", overrides, **{"optim.max_steps": 4,
                                                                            "optim.learning_rate": 0.003}))
    assert second.version == 2
    AdapterRegistry(mlflow_uri).promote("tiny-support", 2)
    time.sleep(1)  # the gateway's lookup cache (refresh_s 0.5 in the test config)
    v2_answer = ask(client, "tiny-llama:tiny-support")
    assert v2_answer != v1_answer
    rolled = ray_app_cli("adapters", "rollback", "tiny-support", "--registry", mlflow_uri)
    assert rolled.returncode == 0 and "version 1" in rolled.stderr, rolled.stderr
    time.sleep(1)
    assert ask(client, "tiny-llama:tiny-support") == v1_answer

    with pytest.raises(openai.NotFoundError):
        ask(client, "tiny-llama:no-such-adapter")
    with pytest.raises(openai.NotFoundError, match="serves no adapters"):
        ask(client, "smollm2-135m-instruct:tiny-support")
    registry = AdapterRegistry(mlflow_uri)
    other = registry.register("tiny-support", trained.run_id, registry.get("tiny-support", "1").source,
                              {"base_serve_name": "smollm2-135m-instruct", "parity": "passed"})
    response = httpx.post(served.v1 + "/chat/completions", timeout=60, json={
        "model": f"tiny-llama:tiny-support@{other.version}", "messages": PROMPT, "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert "smollm2-135m-instruct" in response.json()["error"]["message"]
