"""OpenAI's files and fine-tuning jobs API over ray_app, in-process with the official SDK: the plain
``FineTuningService`` with a fake runner that honours ``JobRunner`` (the job's process is played by the
test: it writes the events and status a real job writes), and a cloud fine-tuner over the loopback
OpenAI server. The real Ray job runs in tests/e2e/test_journey.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from ray_app.training.events import EventLog, StatusFile
from ray_app.fine_tuning.files import FileStore, TrainingFileError, check_training_lines
from ray_app.fine_tuning.jobs import FineTuningService, JobSpec, JobStore, LocalModel
from ray_app.serve.config import GatewayConfig
from ray_app.serve.openai_api import OpenAIService
from ray_app.serve.protocol import ModelCard
from ray_app.serve.routes import HealthReport, build_api
from tests.fakes import FakeLLM


def line(user: str = "Where are invoices?", answer: str = "Under Billing.", **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       **extra})


GOOD = ("\n".join(line(f"question {i}", f"answer {i}") for i in range(4)) + "\n").encode()


class FakeRunner:
    """Submits nothing: the test plays the job's process through ``job_writes``."""

    def __init__(self):
        self.specs: list[JobSpec] = []
        self.states: dict[str, tuple[str, str]] = {}
        self.cancelled: list[str] = []

    def submit(self, spec: JobSpec) -> str:
        self.specs.append(spec)
        runner_id = f"raysubmit_{spec.job_id}"
        self.states[runner_id] = ("pending", "")
        return runner_id

    def state(self, runner_id: str) -> tuple[str, str]:
        return self.states[runner_id]

    def cancel(self, runner_id: str) -> None:
        self.cancelled.append(runner_id)
        self.states[runner_id] = ("stopped", "stopped by the user")


class FakeCloud:
    """What the Router deployment's provider clients return, recorded."""

    def __init__(self):
        self.created: list[tuple[str, bytes, dict]] = []

    async def create(self, target, training, filename, params):
        self.created.append((target, training, params))
        return {"id": "ftjob-provider-1", "status": "validating_files", "fine_tuned_model": None}

    async def retrieve(self, target, provider_job_id):
        return {"id": provider_job_id, "status": "succeeded", "fine_tuned_model": "ft:gpt-4o-mini:org::abc",
                "trained_tokens": 1234}

    async def cancel(self, target, provider_job_id):
        return {"id": provider_job_id, "status": "cancelled"}


def privacy(data: bytes) -> list[str]:
    from ray_app.router.privacy import training_file_reasons

    return training_file_reasons(data)


class Harness:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.runner, self.cloud = FakeRunner(), FakeCloud()
        self.service = self.make()
        llms = {"small": FakeLLM(), "plain": FakeLLM()}
        cards = {n: ModelCard(id=n) for n in llms}
        api = OpenAIService(llms, {}, cards)

        async def health() -> HealthReport:
            return HealthReport(True)

        app = build_api(api, GatewayConfig(max_request_bytes=1 << 20), health, fine_tuning=self.service)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        self.client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=self.http,
                                         max_retries=0)

    def make(self) -> FineTuningService:
        return FineTuningService(
            FileStore(self.root / "files"), JobStore(self.root / "fine_tuning" / "jobs.sqlite"),
            root=self.root / "fine_tuning", data_dir=str(self.root),
            models={"small": LocalModel("small", "tiny-llama", adapters=True),
                    "plain": LocalModel("plain", "tiny-llama", adapters=False)},
            template={"method": "lora", "optim": {"learning_rate": 0.001, "epochs": 3}},
            runner=self.runner, cloud_models={"gpt-4o-mini": "openai-mini"}, cloud=self.cloud,
            privacy_reasons=privacy)

    async def upload(self, data: bytes = GOOD, name: str = "train.jsonl") -> str:
        return (await self.client.files.create(file=(name, data), purpose="fine-tune")).id


@pytest.fixture
def h(tmp_path) -> Harness:
    return Harness(tmp_path)


def test_training_lines_are_checked_with_their_numbers():
    data = (line() + "\n" + "{not json\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
            + json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n").encode()
    usable, problems = check_training_lines(data)
    assert usable == 1 and [(p.line, p.problem.split(" ")[0]) for p in problems] == [
        (2, "not"), (3, "no"), (4, "messages[0].role")]
    with pytest.raises(TrainingFileError, match="line 1: no assistant message"):
        check_training_lines(json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode())
    with pytest.raises(TrainingFileError, match="empty"):
        check_training_lines(b"\n\n")


async def test_files_create_list_retrieve_content_delete_and_survive_a_restart(h: Harness):
    bad_line = GOOD + b"{oops\n"
    created = await h.client.files.create(file=("train.jsonl", bad_line), purpose="fine-tune")
    assert created.bytes == len(bad_line) and created.purpose == "fine-tune" and created.filename == "train.jsonl"
    assert "line 5" in created.status_details  # kept, with what the trainer will skip
    assert [f.id for f in (await h.client.files.list()).data] == [created.id]
    assert (await h.client.files.retrieve(created.id)).bytes == len(bad_line)
    assert (await h.client.files.content(created.id)).content == bad_line
    reopened = FileStore(h.root / "files")  # a server restart
    assert reopened.get(created.id).lines == 4
    deleted = await h.client.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        await h.client.files.retrieve(created.id)


async def test_a_file_with_no_usable_line_is_refused_naming_the_line(h: Harness):
    with pytest.raises(openai.BadRequestError) as exc:
        await h.client.files.create(file=("bad.jsonl", b'{"messages": []}\n{"x": 1}\n'), purpose="fine-tune")
    assert "line 1" in exc.value.body["message"] and exc.value.body["param"] == "file"
    assert exc.value.body["code"] == "invalid_training_file"


async def test_a_local_job_is_queued_submitted_and_succeeds_with_a_servable_model(h: Harness):
    file_id = await h.upload()
    job = await h.client.fine_tuning.jobs.create(model="small", training_file=file_id, suffix="handbook",
                                                 hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 2})
    assert job.status == "queued" and job.model == "small" and job.fine_tuned_model is None
    [spec] = h.runner.specs
    assert (spec.base_model, spec.base_source, spec.n_epochs, spec.learning_rate_multiplier) == (
        "small", "tiny-llama", 2, 2.0)
    assert spec.adapter.startswith("handbook-") and Path(spec.training_file).read_bytes() == GOOD
    from ray_app.fine_tuning.job import train_config

    config = train_config(spec)
    assert (config.name, config.base_model, config.serve_name, config.optim.epochs) == (
        spec.adapter, "tiny-llama", "small", 2)
    assert config.optim.learning_rate == pytest.approx(0.002) and config.tracking.register_model
    assert config.data.chat_template is None  # "small" is served with the model's own template
    # a model served with a tool-calling template is trained with that same template
    from dataclasses import replace

    assert train_config(replace(spec, chat_template="smollm2-tools")).data.chat_template == "smollm2-tools"

    # the job's process starts, reports a step, and finishes
    events, status = EventLog(spec.events_path), StatusFile(spec.status_path)
    status.write("running")
    h.runner.states[f"raysubmit_{job.id}"] = ("running", "")
    events.add("step 1/4: training loss=2.1", data={"step": 1, "train_loss": 2.1}, kind="metrics")
    events.add("checkpoint at step 1", data={"step": 1, "metrics": {"train_loss": 2.1}, "checkpoint": "ck-1"},
               kind="checkpoint")
    assert (await h.client.fine_tuning.jobs.retrieve(job.id)).status == "running"
    status.write("succeeded", fine_tuned_model=f"small:{spec.adapter}", trained_tokens=321)
    h.runner.states[f"raysubmit_{job.id}"] = ("succeeded", "")
    done = await h.client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == f"small:{spec.adapter}"
    assert done.trained_tokens == 321 and done.finished_at is not None
    messages = [e.message for e in (await h.client.fine_tuning.jobs.list_events(job.id)).data]
    assert messages[-1].startswith("Validating training file") and "queued" in messages[-2]  # newest first
    assert any("training loss" in m for m in messages)
    [checkpoint] = (await h.client.fine_tuning.jobs.checkpoints.list(job.id)).data
    assert checkpoint.step_number == 1 and checkpoint.metrics.train_loss == 2.1


async def test_jobs_wait_for_a_slot_list_with_pagination_and_survive_a_restart(h: Harness):
    file_id = await h.upload()
    first = await h.client.fine_tuning.jobs.create(model="small", training_file=file_id)
    second = await h.client.fine_tuning.jobs.create(model="small", training_file=file_id)
    assert len(h.runner.specs) == 1  # one at a time on this machine; the second waits its turn
    page = await h.client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [second.id] and page.has_more
    rest = await h.client.fine_tuning.jobs.list(limit=1, after=second.id)
    assert [j.id for j in rest.data] == [first.id] and not rest.has_more
    h.runner.states[f"raysubmit_{first.id}"] = ("failed", "exit code 1: out of memory")
    await h.service.tick()
    failed = await h.client.fine_tuning.jobs.retrieve(first.id)
    assert failed.status == "failed" and "out of memory" in failed.error.message
    assert len(h.runner.specs) == 2  # the slot is free again: the second one started
    restarted = h.make()  # a server restart: the same rows, the same folders
    assert (await restarted.retrieve(second.id))["status"] == "queued"
    assert [j["id"] for j in (await restarted.list())["data"]] == [second.id, first.id]


async def test_cancel_stops_the_job(h: Harness):
    file_id = await h.upload()
    job = await h.client.fine_tuning.jobs.create(model="small", training_file=file_id)
    cancelled = await h.client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and h.runner.cancelled == [f"raysubmit_{job.id}"]
    await h.service.tick()
    assert (await h.client.fine_tuning.jobs.retrieve(job.id)).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        await h.client.fine_tuning.jobs.cancel(job.id)


async def test_errors_are_in_openais_format(h: Harness):
    file_id = await h.upload()
    with pytest.raises(openai.NotFoundError) as exc:
        await h.client.fine_tuning.jobs.create(model="gpt-9", training_file=file_id)
    assert exc.value.body["code"] == "model_not_found" and "small" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        await h.client.fine_tuning.jobs.create(model="plain", training_file=file_id)
    assert "cannot take adapters" in exc.value.body["message"] and exc.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as exc:
        await h.client.fine_tuning.jobs.create(model="small", training_file="file-nope")
    assert exc.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError):
        await h.client.fine_tuning.jobs.create(model="small", training_file=file_id, hyperparameters={"n_epochs": 99})
    with pytest.raises(openai.NotFoundError):
        await h.client.fine_tuning.jobs.retrieve("ftjob-nope")
    assert not h.runner.specs


async def test_a_cloud_model_is_fine_tuned_at_the_provider_unless_the_file_is_confidential(h: Harness):
    confidential = (line("pay bands?", "Band 4 tops at 140k.",
                         metadata={"doc_id": "d1", "chunk": 0, "sensitivity": "confidential"}) + "\n").encode()
    with pytest.raises(openai.BadRequestError) as exc:
        await h.client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=await h.upload(confidential))
    assert exc.value.body["code"] == "confidential_data" and "confidential" in exc.value.body["message"]
    pii = (line("my card?", "It is 4111 1111 1111 1111.") + "\n").encode()
    with pytest.raises(openai.BadRequestError, match="PII"):
        await h.client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=await h.upload(pii))
    assert not h.cloud.created
    clean = (line("hi", "hello", metadata={"doc_id": "d2", "chunk": 0, "sensitivity": "public"}) + "\n").encode()
    job = await h.client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=await h.upload(clean))
    [(target, sent, params)] = h.cloud.created
    assert target == "openai-mini" and b"metadata" not in sent and params["model"] == "gpt-4o-mini"
    assert job.status == "validating_files"
    tracked = await h.client.fine_tuning.jobs.retrieve(job.id)  # in the same list, status from the provider
    assert tracked.status == "succeeded" and tracked.fine_tuned_model == "ft:gpt-4o-mini:org::abc"


class ProvidersAsCloud:
    """The Router deployment's methods, called in process (the gateway reaches them through a handle)."""

    def __init__(self, providers):
        self.create, self.retrieve, self.cancel = (providers.fine_tune_create, providers.fine_tune_retrieve,
                                                   providers.fine_tune_cancel)


@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_cloud_jobs_speak_the_providers_wire_protocol(tmp_path, kind):
    from ray_app.router.config import RouterConfig
    from ray_app.serve.router import CloudProviders
    from tests.router_servers import OpenAIServer

    server = OpenAIServer().start()
    try:
        base = {"base_url": server.url, "api_version": "2024-10-21"} if kind == "azure" else {
            "base_url": server.url + "/v1"}
        config = RouterConfig.model_validate({
            "targets": [{"name": "cloud-t", "kind": kind, "model": "gpt-4o-mini-2024-07-18", "api_key_env": "K",
                         "context_window": 8192, "price_in_per_mtok": 1, "price_out_per_mtok": 2, **base}],
            "routes": {"auto": {"targets": ["cloud-t"]}}})
        h = Harness(tmp_path)
        h.service.cloud_models, h.service.cloud = {"gpt-4o-mini": "cloud-t"}, ProvidersAsCloud(
            CloudProviders(config, environ={"K": "sk-loop"}))
        public = (line("hi", "hello", metadata={"doc_id": "d2", "chunk": 0, "sensitivity": "public"}) + "\n").encode()
        job = await h.client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=await h.upload(public),
                                                     suffix="handbook", hyperparameters={"n_epochs": 2})
        upload, create = server.requests[:2]
        prefix = "/openai" if kind == "azure" else "/v1"
        assert (upload.path, create.path) == (prefix + "/files", prefix + "/fine_tuning/jobs")
        if kind == "azure":
            assert upload.headers["api-key"] == "sk-loop" and create.query == {"api-version": "2024-10-21"}
        else:
            assert create.headers["authorization"] == "Bearer sk-loop"
        # the provider got the file without our provenance, and the job for the target's model
        assert server.files[create.body["training_file"]] == (line("hi", "hello") + "\n").encode()
        assert create.body["model"] == "gpt-4o-mini-2024-07-18" and create.body["suffix"] == "handbook"
        assert create.body["hyperparameters"] == {"n_epochs": 2}
        assert job.status == "validating_files" and job.id.startswith("ftjob-")

        assert (await h.client.fine_tuning.jobs.retrieve(job.id)).status == "running"
        done = await h.client.fine_tuning.jobs.retrieve(job.id)  # status and model as the provider has them
        assert done.status == "succeeded" and done.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:")
        assert [j.id for j in (await h.client.fine_tuning.jobs.list()).data] == [job.id]

        second = await h.client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=await h.upload(public))
        cancelled = await h.client.fine_tuning.jobs.cancel(second.id)
        assert cancelled.status == "cancelled" and server.requests[-1].path.endswith("/cancel")
    finally:
        server.stop()
