"""The platform loop on a laptop, started the way the README starts it, while the server keeps answering.

``serve run`` (the README's first command, in a subprocess of its own) brings up the shipped
``serve_config.yaml`` application plus the tiny random Llama (with adapters: it trains in seconds), on a
Ray cluster whose logical CPUs are the machine's cores: the Serve graph reserves most of them, which is
exactly the contention a user meets. Then, as a user would, over HTTP and with the README's commands:
a collection is created and fed (HTTP upload and ``ray-app ingest``), a training set is built from it
with the tiny model as the teacher, the tiny model is fine-tuned through the ``openai`` client's
``files`` and ``fine_tuning.jobs``, its ``fine_tuned_model`` answers, a second job is cancelled and its
Ray job stops, and the README's ``ray job submit`` fine-tuning command runs as written. A chat client
runs the whole time: not one of its requests may fail. Last, Ctrl-C stops the server and everything it
started.

These tests run first in the session (``conftest.py``), before the session's own cluster starts, so the
README's default addresses (the dashboard on :8265, ``address="auto"``) find this cluster and only it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.corpus import FACTS, make_corpus
from tests.e2e.conftest import ROOT, TINY, free_port, kill_session, session_processes, wait_for

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
CHAT_MODEL = "smollm2-135m-instruct"


def readme_command(*needles: str) -> str:
    """The one line of the README's shell blocks that holds every needle: what a user would paste."""
    lines = {line.split("  #")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()}
    found = [line for line in lines if all(n in line for n in needles) and not line.startswith("#")]
    assert len(found) == 1, f"README commands with {needles}: {found}"
    return found[0]


def readme_serve_env() -> dict[str, str]:
    """The variables the README's serve command sets before `serve run`."""
    command = readme_command("serve run serve_config.yaml")
    words = command.split("&&")[-1].split()
    return dict(w.split("=", 1) for w in words[:words.index(next(w for w in words if "=" not in w))])


@dataclass
class Chatter:
    """A user chatting with the server the whole time, one request after another."""

    url: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=180) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    r = client.post(self.url, json={"model": CHAT_MODEL, "max_tokens": 8, "messages": [
                        {"role": "user", "content": "Say hello."}]})
                    if r.status_code != 200 or not r.json()["choices"][0]["message"]["content"]:
                        self.failures.append(f"{r.status_code}: {r.text[:300]}")
                    else:
                        self.latencies.append(time.monotonic() - start)
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Laptop:
    root: Path  # the run's folder: its serve config, data directory, corpus, datasets
    proc: subprocess.Popen  # `serve run`, leader of its own session
    port: int
    env: dict[str, str]
    chatter: Chatter
    state: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def sh(self, command: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """A README command, with `$PWD/data` meaning this run's data directory (the server's)."""
        command = command.replace("$PWD/data", str(self.data)).replace("$PWD", str(ROOT))
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        print(f"$ {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def ray_python(self, code: str) -> dict:
        """``code`` in a driver that joins the cluster as a job script does; its last line is JSON."""
        script = ("from ray_app.cluster import prepare_driver_env\nprepare_driver_env()\nimport json, ray\n"
                  "ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n" + code)
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def laptop_config(port: int, data: Path) -> dict:
    """The shipped serve_config.yaml on its own port and data directory, plus the tiny model with adapters."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"]["data_dir"] = str(data)
    tiny = copy.deepcopy(TINY) | {"engine_cpus": 0.1, "adapters": {"max_per_replica": 2, "max_rank": 16,
                                                                   "refresh_s": 1}}
    tiny["replicas"] = {"num_replicas": 1}
    app["args"]["llms"].append(tiny)
    return config


@pytest.fixture(scope="module")
def laptop(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("laptop")
    port = free_port()
    (root / "serve.yaml").write_text(yaml.safe_dump(laptop_config(port, root / "data"), sort_keys=False))
    drop = ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_APP_DATA_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {
        # the models prepared once for the session; everything the run writes stays in its own folder
        "RAY_APP_MODELS_DIR": str(data_dir.models), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"} | readme_serve_env()
    log = (root / "serve.log").open("w")
    # the README's first command, in a session of its own so that everything it started can be found. Ctrl-C
    # works as in a terminal even when pytest runs in the background, where the shell ignores SIGINT for it
    # and that would pass on to `serve run`.
    proc = subprocess.Popen([str(VENV_BIN / "serve"), "run", str(root / "serve.yaml")], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chatter = Chatter(f"http://127.0.0.1:{port}/v1/chat/completions")
    thread = None
    try:
        try:
            wait_for(f"http://127.0.0.1:{port}/health", timeout_s=420)
        except TimeoutError:
            pytest.fail(f"serve run did not come up:\n{(root / 'serve.log').read_text()[-8000:]}")
        thread = threading.Thread(target=chatter.run, daemon=True)
        thread.start()
        yield Laptop(root, proc, port, env, chatter)
    finally:
        chatter.stop()
        if thread is not None:
            thread.join(timeout=200)
        if proc.poll() is None:  # the Ctrl-C test did not get to run
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        kill_session(proc.pid)  # whatever is left would hold its memory through the rest of the session
        log.close()


def test_the_cluster_is_the_machine_and_the_server_holds_it(laptop):
    resources = laptop.ray_python("print(json.dumps({'total': ray.cluster_resources().get('CPU', 0), "
                                  "'free': ray.available_resources().get('CPU', 0)}))")
    # logical CPUs = the machine's cores, as `serve run` gives them; the Serve graph reserves most of them
    assert resources["total"] == os.cpu_count(), resources
    assert resources["free"] < 1, resources
    models = {m.id for m in laptop.client().models.list().data}
    assert {CHAT_MODEL, "tiny-llama", "all-minilm-l6-v2"} <= models


def test_a_collection_is_created_and_fed_over_http_and_by_ray_app_ingest(laptop):
    corpus = laptop.root / "docs"
    make_corpus(corpus, with_broken=False)
    http = httpx.Client(base_url=laptop.base_url, timeout=120)

    missing = http.post("/v1/collections/handbook/documents", files={"file": ("a.txt", b"some text")})
    assert missing.status_code == 404 and "POST /v1/collections" in missing.json()["error"]["message"]

    created = http.post("/v1/collections", json={"name": "handbook", "default_sensitivity": "internal"})
    assert created.status_code == 201, created.text
    assert http.post("/v1/collections", json={"name": "handbook"}).status_code == 409
    upload = http.post("/v1/collections/handbook/documents",
                       files={"file": ("refunds.html", (corpus / "refunds.html").read_bytes())})
    assert upload.status_code == 201 and upload.json()["status"] == "indexed", upload.text

    # the README's command, beside the running server (it joins the server's cluster)
    ingest = laptop.sh(readme_command("ray-app ingest ./docs --collection handbook").replace(
        "./docs", str(corpus)) + f" --data-dir {laptop.data}", timeout_s=420)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    summary = json.loads([line for line in ingest.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["status"] == "complete" and summary["indexed"] + summary["unchanged"] == len(FACTS), summary

    fact = next(f for f in FACTS if f.file == "cafeteria.txt")
    hits = http.post("/v1/retrieve", json={"collection": "handbook", "query": fact.question, "top_k": 3}).json()
    assert any(fact.answer in hit["text"] for hit in hits["data"]), hits
    listed = {c["name"]: c for c in http.get("/v1/collections").json()["data"]}
    assert listed["handbook"]["documents"] >= len(FACTS)


def test_a_training_set_is_built_from_the_collection_with_the_tiny_teacher(laptop):
    config = yaml.safe_load((ROOT / "configs" / "dataset.yaml").read_text())
    # the tiny model writes random words: the language and grounding filters would rightly keep none
    config["filters"] |= {"language": None, "min_grounding": 0}
    (laptop.root / "dataset.yaml").write_text(yaml.safe_dump(config))
    out = laptop.root / "handbook.jsonl"
    command = readme_command("ray-app dataset build --collection handbook")
    command = command.replace("data/datasets/handbook.jsonl", str(out)) + (
        f" --config {laptop.root / 'dataset.yaml'} --teacher tiny-llama --endpoint {laptop.base_url}/v1"
        f" --data-dir {laptop.data} --no-progress")
    built = laptop.sh(command, timeout_s=420)
    assert built.returncode == 0, built.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((laptop.root / "handbook.jsonl.report.json").read_text())
    assert report["kept"] == len(records) >= 4 and report["documents"] >= len(FACTS)
    for record in records:
        assert [m["role"] for m in record["messages"]][-2:] == ["user", "assistant"]
        assert {"doc_id", "sensitivity", "kind"} <= set(record["metadata"]), record["metadata"]
    assert {r["metadata"]["kind"] for r in records} >= {"summary", "pair"}
    assert set(report["kept_fraction"]) >= {"structure", "length", "duplicate", "near_duplicate"}
    laptop.state["dataset"] = out


def test_fine_tuning_over_the_openai_api_serves_the_result_without_a_restart(laptop):
    client = laptop.client()
    training = client.files.create(file=laptop.state["dataset"].open("rb"), purpose="fine-tune")
    assert training.status == "processed" and training.bytes == laptop.state["dataset"].stat().st_size
    with pytest.raises(openai.NotFoundError, match="tiny-llama"):  # the message lists what can be tuned
        client.fine_tuning.jobs.create(model="no-such-model", training_file=training.id)

    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, suffix="handbook",
                                         hyperparameters={"n_epochs": 1}, seed=0)
    seen = [job.status]
    deadline = time.monotonic() + 420
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}"
        if job.status != seen[-1]:
            seen.append(job.status)
        time.sleep(2)
    events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    assert job.status == "succeeded", (job.error, events)
    # the file is validated before create answers (a bad line is a 400 there), so the job starts queued
    assert seen[0] == "queued" and "running" in seen and events[0].startswith("Validating training file"), seen
    assert job.fine_tuned_model.startswith("tiny-llama:handbook-") and job.trained_tokens > 0
    assert any("loss" in e for e in events) and any("promot" in e.lower() for e in events), events
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data

    # the running server answers with it now: same process, same config
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8,
                                           messages=[{"role": "user", "content": "Where is the cafeteria?"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    laptop.state["file"] = training.id


def test_a_cancelled_job_stops_its_ray_job(laptop):
    client = laptop.client()
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=laptop.state["file"],
                                         suffix="long", hyperparameters={"n_epochs": 50})
    deadline = time.monotonic() + 300
    while client.fine_tuning.jobs.retrieve(job.id).status != "running":
        assert time.monotonic() < deadline
        time.sleep(1)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    status = ""
    while time.monotonic() < deadline:
        done = laptop.sh(f"RAY_AUTH_MODE=token ray job status raysubmit_{job.id}", timeout_s=60)
        status = done.stdout + done.stderr
        if "was stopped" in status or "STOPPED" in status:
            break
        time.sleep(2)
    assert "was stopped" in status or "STOPPED" in status, status
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_the_readmes_ray_job_submit_trains_on_the_servers_cluster(laptop):
    command = readme_command("ray job submit", "jobs/finetune.py", "lora_tiny.yaml")
    done = laptop.sh(command + " --set optim.max_steps=4", timeout_s=600)
    assert done.returncode == 0 and "succeeded" in (done.stdout + done.stderr).lower(), done.stderr[-3000:]
    # registered in the server's registry (the data directory the command named), version 1 of its line
    listed = laptop.sh(f".venv/bin/ray-app adapters list tiny-support --data-dir {laptop.data}", timeout_s=120)
    assert listed.returncode == 0 and re.search(r"│\s*1\s*│", listed.stdout), listed.stdout


def test_the_journey_benchmark_runs_on_this_server(laptop, tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/journey_bench.py", "--smoke", "--endpoint",
                           laptop.base_url + "/v1", "--data-dir", str(laptop.data), "--collection", "handbook",
                           "--out", str(tmp_path)],
                          cwd=ROOT, env=laptop.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "journey_bench_smoke.json").read_text())
    assert (tmp_path / "journey_bench_smoke.png").stat().st_size > 10_000
    results = report["results"]
    assert results["chat"]["idle"]["requests"] > 0 and results["chat"]["training"]["requests"] > 0
    assert results["chat"]["training"]["failed"] == 0, results["chat"]["training"]["failures"]
    assert results["training"]["create_to_first_token_s"] > results["training"]["phases_s"]["running"] > 0
    assert results["dataset"]["kept"] > 0 and set(results["dataset"]["kept_fraction"]) >= {"structure", "length"}


def test_the_server_answered_every_chat_throughout(laptop):
    laptop.chatter.stop()
    time.sleep(1)
    chats = laptop.chatter
    assert chats.failures == [], chats.failures[:5]
    assert len(chats.latencies) >= 20, len(chats.latencies)
    print(f"{len(chats.latencies)} chats during the journey, p50 {sorted(chats.latencies)[len(chats.latencies) // 2]:.2f} s")


def test_ctrl_c_stops_the_server_and_everything_it_started(laptop):
    laptop.proc.send_signal(signal.SIGINT)  # the user presses Ctrl-C in the README's first command
    try:
        laptop.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass  # returncode stays None: the assertion below shows the log
    log = (laptop.root / "serve.log").read_text()
    assert laptop.proc.returncode == 0, f"exit code after Ctrl-C: {laptop.proc.returncode}\n{log[-4000:]}"
    # Serve stopped every replica in its own time: nothing was force-killed past a deadline
    assert "Got KeyboardInterrupt" in log and "failed to shut down" not in log, log[-4000:]
    deadline = time.monotonic() + 15  # Ray's own processes may take a moment after the driver
    while (left := session_processes(laptop.proc.pid)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == {}
