"""Hostile input and faults against the real app: each test is one way issue 9 found to break the
promises (confidential material stays local, keys mean something, one bad request cannot take the
service down), tried over HTTP with the openai client on the e2e session's cluster.

Decompression bombs are generated (tests/bombs.py) and uploaded for real; the PII scanner gets the
input that made the old phone pattern backtrack; a second application runs in `auth: keys` mode.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import openai
import pytest

from tests import bombs
from tests.e2e.conftest import ROOT, wait_for

pytestmark = pytest.mark.e2e

LOCKED = "ray_app_locked"


@pytest.fixture
def client(served, clouds) -> openai.OpenAI:
    clouds.reset()
    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def collection(served):
    name = f"adv-{uuid.uuid4().hex[:8]}"
    created = httpx.post(served.v1 + "/collections", json={"name": name}, timeout=60)
    assert created.status_code == 201, created.text
    yield name
    httpx.delete(f"{served.v1}/collections/{name}", timeout=60)


def upload(served, collection: str, name: str, data: bytes, **form) -> httpx.Response:
    return httpx.post(f"{served.v1}/collections/{collection}/documents", files={"file": (name, data)}, data=form,
                      timeout=600)


def replica_ids(deployment: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(filters=[("class_name", "=", f"ServeReplica:ray_app:{deployment}"),
                                                     ("state", "=", "ALIVE")])}


def test_a_new_label_on_a_reupload_reaches_every_chunk_and_keeps_rag_local(served, client, clouds, collection):
    pay = b"# Pay\n\nThe 2027 salary bands for engineers are reviewed by the pay committee in March.\n"
    assert upload(served, collection, "pay.md", pay).status_code == 201
    relabelled = upload(served, collection, "pay.md", pay, sensitivity="confidential")
    assert relabelled.status_code == 200 and relabelled.json()["status"] == "relabelled"
    hits = httpx.post(served.v1 + "/retrieve", json={"collection": collection, "query": "salary bands"},
                      timeout=60).json()["data"]
    assert hits and {h["sensitivity"] for h in hits} == {"confidential"}
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "When are salary bands reviewed?"}], max_tokens=8,
        extra_body={"rag": {"collection": collection}})
    assert raw.headers["x-ray-app-route"] == "auto/local-small"
    assert "confidential chunk" in raw.headers["x-ray-app-reason"]
    assert not any("salary" in body for body in clouds.bodies())


def test_client_errors_do_not_open_the_local_breaker(served, client):
    # ~2,100 real tokens (a digit and a space each), ~1,100 by the router's estimate: the engine refuses it
    too_long = [{"role": "user", "content": "7 " * 2100}]
    for _ in range(6):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="private", messages=too_long, max_tokens=1)
        assert exc.value.status_code == 400
    answer = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        extra_headers={"x-confidential": "true"})
    assert answer.headers["x-ray-app-route"] == "auto/local-small"  # not 503 no_local_target
    health = httpx.get(served.base_url + "/health", timeout=30).json()
    assert health["targets"]["local-small"]["status"] in ("ok", "degraded")


def test_the_pii_scan_is_linear_on_the_input_that_made_it_backtrack(served, client):
    bomb = (" +" + "1" * 28) * 13_000  # 390 KB
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": bomb}], max_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded"  # scanned in full, then refused by the policy
    bomb_s = time.monotonic() - started
    started = time.monotonic()
    assert client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices
    print(f"390 KB worst case answered in {bomb_s:.2f} s; the next request in {time.monotonic() - started:.2f} s")


def test_lookalike_separators_do_not_smuggle_a_card_to_the_cloud(served, client, clouds):
    for card in ("4111\u00a01111\u00a01111\u00a01111", "4111\u20131111\u20131111\u20131111", "4111.1111.1111.1111"):
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": f"card {card}"}],
                                           max_tokens=4)
        assert exc.value.status_code == 503 and exc.value.body["code"] == "no_local_target"
    tools = [{"type": "function", "function": {"name": "bill", "description": "IBAN de89 3704 0044 0532 0130 00",
                                               "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "pay"}], tools=tools,
                                       max_tokens=4)
    assert exc.value.body["code"] == "no_local_target"
    assert not clouds.bodies()


BOMBS = {  # file -> (maker, the refusal code, its HTTP status)
    "20000-pages.pdf": ("many_pages_pdf", "too_many_pages", 413),
    "poster.pdf": ("huge_page_pdf", "too_large", 413),
    "bomb.docx": ("zip_bomb_docx", "too_large", 413),
    "frames.tiff": ("many_frames_tiff", "too_many_pages", 413),
    "declared.png": ("huge_declared_png", "too_large", 413),
}


def test_decompression_bombs_are_refused_and_the_replicas_survive(served, collection):
    before = {d: replica_ids(d) for d in ("Knowledge", "OCR")}
    assert all(before.values())
    for name, (maker, code, status) in BOMBS.items():
        response = upload(served, collection, name, getattr(bombs, maker)())
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] == code, name
    for name in ("poster.pdf", "frames.tiff", "declared.png"):
        maker, code, status = BOMBS[name]
        response = httpx.post(served.v1 + "/ocr", files={"file": (name, getattr(bombs, maker)())}, timeout=300)
        assert response.status_code == status and response.json()["error"]["code"] == code, name
    assert {d: replica_ids(d) for d in ("Knowledge", "OCR")} == before  # same processes: nothing crashed
    fine = upload(served, collection, "fine.md", b"# Fine\n\nA normal document after the bombs.\n")
    assert fine.status_code == 201


def test_the_store_actor_comes_back_after_its_process_dies(served, collection):
    import ray

    from ray_app.documents.config import IngestConfig
    from ray_app.documents.store_actor import get_store

    assert upload(served, collection, "memo.md", b"# Memo\n\nThe offsite is in Lisbon.\n").status_code == 201
    config = IngestConfig.load(ROOT / "configs" / "ingest.yaml")
    store = get_store(config.store, config.paths)
    pid = ray.get(store.pid.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # calls in flight are retried on the restarted actor; new ones wait for it
        response = httpx.post(served.v1 + "/retrieve", json={"collection": collection, "query": "offsite"},
                              timeout=60)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert response.status_code == 200, response.text
    assert "Lisbon" in response.json()["data"][0]["text"]
    assert ray.get(store.pid.remote()) != pid


@pytest.fixture(scope="module")
def locked(ray_cluster, tmp_path_factory) -> tuple[str, str]:
    """A second application in `auth: keys` mode whose ledger holds no key yet."""
    from ray import serve

    from ray_app.serve.app import build_app

    ledger = tmp_path_factory.mktemp("locked") / "ledger.sqlite"
    args = {"embedders": [{"name": "all-minilm-l6-v2", "source": "all-minilm-l6-v2",
                           "replicas": {"num_replicas": 1, "num_cpus": 0}}],
            "gateway": {"replicas": {"num_replicas": 1, "num_cpus": 0}},
            "auth": {"mode": "keys", "ledger_path": str(ledger)}}
    serve.run(build_app(args), name=LOCKED, route_prefix="/locked")
    base = f"http://127.0.0.1:{ray_cluster.http_port}/locked"
    wait_for(base + "/health")
    yield base, str(ledger)
    serve.delete(LOCKED)


def test_keys_mode_fails_closed_from_the_first_request(locked):
    from ray_app.accounting.keys import KeyStore

    base, ledger = locked
    anonymous = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # no key exists: closed, not open
        anonymous.embeddings.create(model="all-minilm-l6-v2", input="hello")
    assert httpx.get(base + "/v1/system/status", timeout=30).status_code == 401
    assert httpx.get(base + "/health", timeout=30).json()["auth"] == "keys"
    keys = KeyStore(ledger)
    new = keys.create("e2e")
    keyed = openai.OpenAI(base_url=base + "/v1", api_key=new.secret, max_retries=0)
    assert len(keyed.embeddings.create(model="all-minilm-l6-v2", input="hello").data[0].embedding) == 384
    assert httpx.get(base + "/v1/system/status", timeout=30,
                     headers={"authorization": f"Bearer {new.secret}"}).status_code == 403  # not an admin
    keys.revoke(new.record.key_id)  # the last key: closed again
    with pytest.raises(openai.AuthenticationError):
        keyed.embeddings.create(model="all-minilm-l6-v2", input="hello")
    with pytest.raises(openai.AuthenticationError):
        anonymous.embeddings.create(model="all-minilm-l6-v2", input="hello")
