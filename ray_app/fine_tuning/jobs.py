"""``/v1/fine_tuning/jobs``: OpenAI's fine-tuning jobs over ray_app's own training.

``FineTuningService`` is a plain class. A job on a model this app serves (with ``adapters:``) runs as
a Ray job on this cluster (``RayJobRunner``: the Ray Train LoRA code of ``ray_app.training``, tracked
in MLflow, registered, promoted when its parity check passes), and its ``fine_tuned_model``
(``<base>:<adapter>``) answers on the running server as soon as it succeeds. A job on a cloud model (a
router target of kind openai or azure) is created at the provider through the Router deployment and
tracked in the same list; it is refused when the training file holds confidential material.

Jobs survive a restart: they are rows in ``<data_dir>/fine_tuning/jobs.sqlite``, and each local job's
folder holds what its process wrote (events, status). ``tick`` (the gateway calls it every few
seconds) moves jobs along: it starts queued jobs when a slot is free and reads the status of running
ones from their runner.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field

from ray_app.training.events import EventLog, StatusFile
from ray_app.fine_tuning.files import FileStore, TrainingFileError, check_training_lines
from ray_app.schema import Strict

__all__ = ["CloudFineTuner", "FineTuningError", "FineTuningService", "JobCreate", "JobRunner", "JobSpec",
           "JobStore", "LocalModel"]

Status = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")


class FineTuningError(Exception):
    """A request the API refuses: ``status`` 400/404, ``param`` the field, ``code`` machine-readable."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


class Hyperparameters(Strict):
    n_epochs: int | Literal["auto"] = Field("auto", description="Passes over the training file (1-50).")
    batch_size: int | Literal["auto"] = Field("auto", description="Examples per step (1-256).")
    learning_rate_multiplier: float | Literal["auto"] = Field("auto", description="Scales the template's rate.")


class JobCreate(Strict):
    """The body of ``POST /v1/fine_tuning/jobs`` (OpenAI's fields; ``method`` and ``integrations`` are
    accepted but only supervised LoRA runs here)."""

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(None, max_length=128)
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    method: dict[str, Any] | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class LocalModel:
    """A served LLM a job can fine-tune: its source, whether it serves adapters, and the chat template
    it is served with when that is not its own (tool calling): jobs train with the same one."""

    name: str
    source: str
    adapters: bool
    chat_template: str | None = None


@dataclass
class JobSpec:
    """Everything a local job's process needs (written into its folder as ``spec.json``)."""

    job_id: str
    base_model: str  # the served name
    base_source: str
    adapter: str  # the adapter line: fine_tuned_model is "<base_model>:<adapter>"
    training_file: str
    validation_file: str | None
    n_epochs: int | None
    batch_size: int | None
    learning_rate_multiplier: float | None
    seed: int
    template: dict[str, Any]
    data_dir: str
    folder: str
    promote: bool = True
    chat_template: str | None = None  # the served model's, when it is not the model's own

    @property
    def events_path(self) -> Path:
        return Path(self.folder) / "events.jsonl"

    @property
    def status_path(self) -> Path:
        return Path(self.folder) / "status.json"

    def save(self) -> Path:
        path = Path(self.folder) / "spec.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))


class JobRunner(Protocol):
    """Runs a local job's process (``RayJobRunner``; tests use a fake with the same interface)."""

    def submit(self, spec: JobSpec) -> str: ...
    def state(self, runner_id: str) -> tuple[str, str]: ...  # (pending|running|succeeded|failed|stopped, detail)
    def cancel(self, runner_id: str) -> None: ...


class CloudFineTuner(Protocol):
    """A provider's fine-tuning API for a cloud target (the Router deployment's provider clients)."""

    async def create(self, target: str, training: bytes, filename: str, params: dict[str, Any]) -> dict[str, Any]: ...
    async def retrieve(self, target: str, provider_job_id: str) -> dict[str, Any]: ...
    async def cancel(self, target: str, provider_job_id: str) -> dict[str, Any]: ...


class JobStore:
    """Jobs as JSON rows in SQLite, newest first."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
                         "body TEXT NOT NULL)")

    def put(self, job: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, created_at, body) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE "
                             "SET body = excluded.body", (job["id"], job["_created"], json.dumps(job)))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM jobs ORDER BY created_at DESC, id DESC").fetchall()
        return [json.loads(r[0]) for r in rows]


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit}


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


class FineTuningService:
    def __init__(self, files: FileStore, store: JobStore, *, root: Path, data_dir: str,
                 models: dict[str, LocalModel], template: dict[str, Any], runner: JobRunner | None,
                 cloud_models: dict[str, str] | None = None, cloud: CloudFineTuner | None = None,
                 privacy_reasons: Callable[[bytes], list[str]] | None = None, max_running: int = 1,
                 promote: bool = True, clock: Callable[[], float] = time.time):
        self.files, self.store, self.root, self.data_dir = files, store, Path(root), data_dir
        self.models, self.template, self.runner = models, template, runner
        self.cloud_models = cloud_models or {}  # a model name clients send -> its router target
        self.cloud, self.max_running, self.promote, self._clock = cloud, max_running, promote, clock
        self._privacy_reasons = privacy_reasons or (lambda data: [])
        self._lock = asyncio.Lock()

    # -- creating --------------------------------------------------------------------------------

    def _check_file(self, file_id: str, param: str) -> bytes:
        record = self.files.get(file_id)
        if record is None:
            raise FineTuningError(f"no file {file_id!r} (upload one with POST /v1/files, purpose fine-tune)",
                                  param=param, code="file_not_found")
        if record.purpose != "fine-tune":
            raise FineTuningError(f"file {file_id!r} has purpose {record.purpose!r}, not 'fine-tune'", param=param)
        data = self.files.content(file_id)
        try:
            check_training_lines(data)
        except TrainingFileError as e:
            raise FineTuningError(f"file {file_id!r}: {e}", param=param, code="invalid_training_file") from None
        return data

    async def create(self, body: JobCreate) -> dict[str, Any]:
        training = await asyncio.to_thread(self._check_file, body.training_file, "training_file")
        if body.validation_file:
            await asyncio.to_thread(self._check_file, body.validation_file, "validation_file")
        h = body.hyperparameters
        if h.n_epochs != "auto" and not 1 <= h.n_epochs <= 50:
            raise FineTuningError("hyperparameters.n_epochs must be 1-50 or 'auto'", param="hyperparameters.n_epochs")
        if h.batch_size != "auto" and not 1 <= h.batch_size <= 256:
            raise FineTuningError("hyperparameters.batch_size must be 1-256 or 'auto'",
                                  param="hyperparameters.batch_size")
        if h.learning_rate_multiplier != "auto" and not 0 < h.learning_rate_multiplier <= 100:
            raise FineTuningError("hyperparameters.learning_rate_multiplier must be in (0, 100] or 'auto'",
                                  param="hyperparameters.learning_rate_multiplier")
        job_id = f"ftjob-{secrets.token_hex(12)}"
        now = int(self._clock())
        job: dict[str, Any] = {
            "id": job_id, "object": "fine_tuning.job", "created_at": now, "finished_at": None, "model": body.model,
            "fine_tuned_model": None, "organization_id": "org-ray-app", "status": "validating_files",
            "training_file": body.training_file, "validation_file": body.validation_file, "result_files": [],
            "trained_tokens": None, "error": None, "seed": body.seed if body.seed is not None else 42,
            "hyperparameters": h.model_dump(), "suffix": body.suffix, "estimated_finish": None,
            "integrations": body.integrations or [], "metadata": body.metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": h.model_dump()}},
            "_created": self._clock()}
        if body.model in self.cloud_models:
            return await self._create_cloud(job, body, training)
        local = self.models.get(body.model)
        if local is None:
            known = sorted(self.models) + sorted(self.cloud_models)
            raise FineTuningError(f"The model {body.model!r} does not exist or cannot be fine-tuned here; "
                                  f"fine-tunable models: {', '.join(known) or '(none)'}", status=404, param="model",
                                  code="model_not_found")
        if not local.adapters:
            raise FineTuningError(
                f"{body.model!r} cannot take adapters: give it `adapters:` in the Serve config (llms[].adapters) so a "
                "fine-tuned adapter can be served on it", param="model", code="model_not_fine_tunable")
        adapter = f"{body.suffix or 'ft'}-{job_id[-8:]}"
        job |= {"_runner": "local", "_adapter": adapter, "_folder": str(self.root / job_id)}
        Path(job["_folder"]).mkdir(parents=True, exist_ok=True)
        events = EventLog(Path(job["_folder"]) / "events.jsonl")
        events.add(f"Validating training file: {body.training_file}")
        job["status"] = "queued"
        events.add("Files validated, moving job to queued state")
        await asyncio.to_thread(self.store.put, job)
        await self.tick()
        return _public(await self._refresh(job_id))

    async def _create_cloud(self, job: dict[str, Any], body: JobCreate, training: bytes) -> dict[str, Any]:
        target = self.cloud_models[body.model]
        if self.cloud is None:
            raise FineTuningError(f"{body.model!r} is a cloud model and this app has no Router deployment",
                                  param="model")
        reasons = await asyncio.to_thread(self._privacy_reasons, training)
        if reasons:
            raise FineTuningError(f"{body.training_file} may not leave this machine for {target!r}: "
                                  + "; ".join(reasons), param="training_file", code="confidential_data")
        params = {"model": body.model, "suffix": body.suffix, "seed": job["seed"],
                  "hyperparameters": body.hyperparameters.model_dump()}
        record = self.files.get(body.training_file)
        try:
            provider = await self.cloud.create(target, _strip_provenance(training), record.filename, params)
        except Exception as e:  # the provider (or the Router replica) refused: say so, in the API's format
            cause = getattr(e, "cause", None) or e
            status = getattr(cause, "status", None)
            raise FineTuningError(f"{target} did not create the job: {cause}"[:1000],
                                  status=status if status in (400, 404) else 502, param="model") from None
        job |= {"_runner": "cloud", "_target": target, "_provider_id": provider["id"]}
        job = self._merge_provider(job, provider)
        await asyncio.to_thread(self.store.put, job)
        return _public(job)

    @staticmethod
    def _merge_provider(job: dict[str, Any], provider: dict[str, Any]) -> dict[str, Any]:
        for key in ("status", "fine_tuned_model", "finished_at", "trained_tokens", "error", "estimated_finish"):
            if key in provider:
                job[key] = provider[key]
        job["_provider"] = provider
        return job

    # -- moving jobs along -----------------------------------------------------------------------

    async def tick(self) -> None:
        """Read the state of unfinished jobs; start queued local jobs while fewer than ``max_running`` run."""
        async with self._lock:
            jobs = await asyncio.to_thread(self.store.all)
            for job in jobs:
                if job["status"] not in TERMINAL:
                    await self._refresh(job["id"], job)
            jobs = await asyncio.to_thread(self.store.all)
            running = sum(1 for j in jobs if j.get("_runner") == "local"
                          and (j["status"] == "running" or (j["status"] == "queued" and j.get("_runner_id"))))
            for job in sorted((j for j in jobs if j.get("_runner") == "local" and j["status"] == "queued"
                               and not j.get("_runner_id")), key=lambda j: j["_created"]):
                if running >= self.max_running:
                    break
                await self._start(job)
                running += 1

    async def _start(self, job: dict[str, Any]) -> None:
        local = self.models[job["model"]]
        h = job["hyperparameters"]
        spec = JobSpec(
            job_id=job["id"], base_model=local.name, base_source=local.source, adapter=job["_adapter"],
            training_file=str(self.files.path(job["training_file"])),
            validation_file=str(self.files.path(job["validation_file"])) if job["validation_file"] else None,
            n_epochs=None if h["n_epochs"] == "auto" else h["n_epochs"],
            batch_size=None if h["batch_size"] == "auto" else h["batch_size"],
            learning_rate_multiplier=None if h["learning_rate_multiplier"] == "auto" else h["learning_rate_multiplier"],
            seed=job["seed"], template=self.template, data_dir=self.data_dir, folder=job["_folder"],
            promote=self.promote, chat_template=local.chat_template)
        await asyncio.to_thread(spec.save)
        try:
            job["_runner_id"] = await asyncio.to_thread(self.runner.submit, spec)
        except Exception as e:  # the cluster refused the job: the job failed, the API did not
            job |= {"status": "failed", "finished_at": int(self._clock()),
                    "error": {"code": "submit_failed", "message": f"could not start the job: {e}"[:500], "param": None}}
            EventLog(spec.events_path).add(f"Could not start the job: {e}"[:500], level="error")
        await asyncio.to_thread(self.store.put, job)

    async def _refresh(self, job_id: str, job: dict[str, Any] | None = None) -> dict[str, Any]:
        job = job or await asyncio.to_thread(self.store.get, job_id)
        if job is None or job["status"] in TERMINAL:
            return job
        if job.get("_runner") == "cloud":
            provider = await self.cloud.retrieve(job["_target"], job["_provider_id"])
            job = self._merge_provider(job, provider)
        elif job.get("_runner_id"):
            written = StatusFile(Path(job["_folder"]) / "status.json").read() or {}
            state, detail = await asyncio.to_thread(self.runner.state, job["_runner_id"])
            if written.get("status") in ("running", "succeeded", "failed"):
                job["status"] = written["status"]
                for key in ("fine_tuned_model", "trained_tokens", "error", "result_files"):
                    if key in written:
                        job[key] = written[key]
            if state in ("failed", "stopped") and job["status"] not in TERMINAL:
                job["status"] = "cancelled" if state == "stopped" else "failed"
                job["error"] = None if state == "stopped" else {
                    "code": "job_failed", "message": f"the training process ended: {detail}"[:1000], "param": None}
            if job["status"] in TERMINAL:
                job["finished_at"] = int(self._clock())
        await asyncio.to_thread(self.store.put, job)
        return job

    # -- reading and cancelling ------------------------------------------------------------------

    async def _job(self, job_id: str) -> dict[str, Any]:
        job = await self._refresh(job_id)
        if job is None:
            raise FineTuningError(f"no fine-tuning job {job_id!r}", status=404, param="fine_tuning_job_id",
                                  code="job_not_found")
        return job

    async def retrieve(self, job_id: str) -> dict[str, Any]:
        return _public(await self._job(job_id))

    async def list(self, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        jobs = await asyncio.to_thread(self.store.all)
        return _page([_public(j) for j in jobs], after, limit)

    def _events(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        if job.get("_runner") == "cloud":
            return [{"object": "fine_tuning.job.event", "id": f"ftevent-{job['id']}-{job['status']}",
                     "created_at": job["created_at"], "level": "info", "type": "message", "data": {},
                     "message": f"Tracked at {job['_target']} as {job['_provider_id']}: {job['status']}"}]
        return list(reversed(EventLog(Path(job["_folder"]) / "events.jsonl").read()))  # newest first

    async def events(self, job_id: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        job = await self._job(job_id)
        return _page(await asyncio.to_thread(self._events, job), after, limit)

    async def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> dict[str, Any]:
        job = await self._job(job_id)
        found = []
        for event in await asyncio.to_thread(self._events, job):
            if event.get("type") == "checkpoint":
                d = event["data"]
                found.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{event['id'][8:]}",
                              "created_at": event["created_at"], "fine_tuning_job_id": job_id,
                              "step_number": d.get("step"), "metrics": d.get("metrics", {}),
                              "fine_tuned_model_checkpoint": d.get("checkpoint")})
        return _page(found, after, limit)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        job = await self._job(job_id)
        if job["status"] in TERMINAL:
            raise FineTuningError(f"job {job_id} has already {job['status']}", param="fine_tuning_job_id")
        if job.get("_runner") == "cloud":
            job = self._merge_provider(job, await self.cloud.cancel(job["_target"], job["_provider_id"]))
        else:
            if job.get("_runner_id"):
                await asyncio.to_thread(self.runner.cancel, job["_runner_id"])
            job |= {"status": "cancelled", "finished_at": int(self._clock())}
            EventLog(Path(job["_folder"]) / "events.jsonl").add("Job cancelled by the user")
        await asyncio.to_thread(self.store.put, job)
        return _public(job)


def _strip_provenance(training: bytes) -> bytes:
    """The file as a provider takes it: OpenAI's format has no ``metadata`` on a training line."""
    out = []
    for line in training.decode("utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        record.pop("metadata", None)
        out.append(json.dumps(record))
    return ("\n".join(out) + "\n").encode()


_ADAPTER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
