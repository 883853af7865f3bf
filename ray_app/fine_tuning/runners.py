"""Where fine-tuning jobs run: ``RayJobRunner`` submits a local job as a Ray job on this cluster
(through Ray's job submission API, so it shows in the dashboard's Jobs tab with its logs)."""

from __future__ import annotations

import shlex
import sys
from typing import Any, Callable

from ray_app.fine_tuning.jobs import JobSpec

__all__ = ["RayJobRunner"]

_STATES = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
           "STOPPED": "stopped"}


class RayJobRunner:
    """Jobs submitted to the Ray cluster's job API; ``address`` is its dashboard's URL, or a function that
    finds it (the gateway's: the URL the running cluster advertises)."""

    def __init__(self, address: str | Callable[[], str | None] | None = None, python: str = sys.executable):
        self._address, self._python = address, python
        self._client: Any = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self._address() if callable(self._address) else self._address)
        return self._client

    def submit(self, spec: JobSpec) -> str:
        # the job's interpreter is this one: the project's environment, whatever `python` means on the
        # cluster's PATH
        entrypoint = f"{shlex.quote(self._python)} -m ray_app.fine_tuning.job {shlex.quote(str(spec.save()))}"
        return self.client.submit_job(
            entrypoint=entrypoint, submission_id=f"raysubmit_{spec.job_id}",
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
            metadata={"ray_app_fine_tuning_job": spec.job_id})

    def state(self, runner_id: str) -> tuple[str, str]:
        info = self.client.get_job_info(runner_id)
        return _STATES.get(str(info.status.value if hasattr(info.status, "value") else info.status), "pending"), (
            info.message or "")

    def cancel(self, runner_id: str) -> None:
        self.client.stop_job(runner_id)
