"""The process of one local fine-tuning job: ``python -m ray_app.fine_tuning.job <folder>/spec.json``.

The API's ``RayJobRunner`` starts it as a Ray job on the server's cluster. It turns the job's spec
into a ``TrainConfig`` (the Serve config's fine-tuning template, with the job's base model, file,
epochs, batch size and learning rate), runs ``ray_app.training``'s Ray Train code (tracked in MLflow,
evaluated, parity-checked, registered), promotes the new version to its line's champion so
``<base>:<adapter>`` answers at once, and writes its events and final status into its folder. The
work itself runs in a task on the cluster's workers (``cluster.in_cluster``): the job's own process,
in a session of its own, gets almost no CPU beside a busy server.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from ray_app.training.events import EventLog, StatusFile
from ray_app.fine_tuning.jobs import JobSpec

__all__ = ["main", "train_config"]


def train_config(spec: JobSpec):
    """The TrainConfig of a job: its template with what the job decides."""
    from ray_app.training.config import TrainConfig

    document: dict[str, Any] = json.loads(json.dumps(spec.template))  # a deep copy
    document |= {"name": spec.adapter, "base_model": spec.base_source, "serve_name": spec.base_model,
                 "data_dir": spec.data_dir}
    data = document.setdefault("data", {})
    data["train"] = spec.training_file
    data["seed"] = spec.seed
    if spec.chat_template is not None:
        data.setdefault("chat_template", spec.chat_template)
    if spec.validation_file:
        data["validation"] = spec.validation_file
    optim = document.setdefault("optim", {})
    optim["seed"] = spec.seed
    if spec.n_epochs is not None:
        optim["epochs"] = spec.n_epochs
        optim.pop("max_steps", None)
    if spec.batch_size is not None:
        optim["batch_size"] = spec.batch_size
    if spec.learning_rate_multiplier is not None:
        optim["learning_rate"] = float(optim.get("learning_rate", 2e-4)) * spec.learning_rate_multiplier
    document.setdefault("tracking", {})["register_model"] = True
    return TrainConfig.model_validate(document)


def train_and_promote(config, spec: JobSpec, events: EventLog):
    """Train, register and (with ``promote``) make the new version its line's champion: one piece of
    work that runs in the cluster's workers (``in_cluster``), MLflow included."""
    from ray_app.training.finetune import run_training
    from ray_app.training.registry import AdapterRegistry

    result = run_training(config, events=events)
    if spec.promote and result.version is not None:
        forced = result.parity != "passed"
        AdapterRegistry(config.tracking_uri).promote(spec.adapter, result.version, force=forced)
        events.add(f"Version {result.version} of {spec.adapter} promoted to champion"
                   + (" (parity check did not pass)" if forced else ""),
                   level="warn" if forced else "info", data={"version": result.version, "parity": result.parity})
    return result


def main(spec_path: str) -> int:
    spec = JobSpec.load(spec_path)
    events, status = EventLog(spec.events_path), StatusFile(spec.status_path)
    status.write("running")
    events.add("Fine-tuning job started")
    fine_tuned = f"{spec.base_model}:{spec.adapter}"
    try:
        from ray_app.cluster import in_cluster
        from ray_app.training.data import DatasetError

        config = train_config(spec)
        try:
            result = in_cluster(train_and_promote, config, spec, events)
        except DatasetError as e:
            events.add(f"The training file cannot be trained on: {e}", level="error")
            status.write("failed", error={"code": "invalid_training_file", "message": str(e)[:1000],
                                          "param": "training_file"})
            return 2
        tokens = result.trained_tokens
        events.add(f"New fine-tuned model created: {fine_tuned}", data={"fine_tuned_model": fine_tuned})
        events.add("The job has successfully completed")
        status.write("succeeded", fine_tuned_model=fine_tuned, trained_tokens=tokens,
                     result_files=[], registry_version=result.version, eval=result.eval)
        return 0
    except Exception as e:  # the job failed: say why in its own status, the API stays up
        events.add(f"Training failed: {type(e).__name__}: {e}"[:1000], level="error")
        traceback.print_exc()
        status.write("failed", error={"code": "training_failed", "message": f"{type(e).__name__}: {e}"[:1000],
                                      "param": None})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
