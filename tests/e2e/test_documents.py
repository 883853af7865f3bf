"""Documents end to end: the Ray Data pipeline on a generated corpus into the embedded Qdrant engine
(and qdrant-client's local mode), real Tesseract, the real embedder; then the served side over HTTP:
retrieval, RAG with citations, uploads, OCR, and the `ray-app ingest` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from ray_app.documents.config import IngestConfig, StoreConfig
from ray_app.documents.pipeline import run_ingest
from tests.corpus import FACTS, good_files, make_corpus

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(root)
    (root / "hr").mkdir()
    (root / "hr" / "salaries.md").write_text("# Salaries\n\nThe engineering salary band tops out at 140000 euros.\n")
    expected["hr/salaries.md"] = None
    return root, expected


@pytest.fixture(scope="module")
def collection(served, corpus):
    """The corpus ingested into a fresh collection of the served store (dropped afterwards)."""
    import ray

    from ray_app.documents.store_actor import get_store

    name = f"test-{uuid.uuid4().hex[:8]}"
    config = IngestConfig.load(ROOT / "configs" / "ingest.yaml")
    report = run_ingest(str(corpus[0]), name, config, progress=False)
    yield name, report, config
    ray.get(get_store(config.store, config.paths).drop_collection.remote(name))


def store_call(config, method, *args):
    import ray

    from ray_app.documents.store_actor import get_store

    return ray.get(getattr(get_store(config.store, config.paths), method).remote(*args))


def test_every_good_file_is_indexed_and_every_broken_one_reported(collection, corpus):
    name, report, _ = collection
    outcomes = {f.path: f for f in report.files}
    assert set(outcomes) == set(corpus[1])
    for path, code in corpus[1].items():
        if code is None:
            assert outcomes[path].status == "indexed" and outcomes[path].chunks >= 1, outcomes[path]
        else:
            assert (outcomes[path].status, outcomes[path].code) == ("refused", code), outcomes[path]
            assert outcomes[path].reason
    assert report.status == "partial" and report.exit_code == 2
    assert outcomes["scanned_memo.pdf"].ocr_pages == 1 and outcomes["receipt.png"].ocr_pages == 1
    assert outcomes["hr/salaries.md"].sensitivity == "confidential"  # configs/ingest.yaml: hr/** rule
    assert outcomes["handbook.pdf"].sensitivity == "internal"


def test_chunks_carry_their_metadata(collection):
    name, report, config = collection
    docs = store_call(config, "documents", name)
    handbook = next(d for d in docs.values() if d["path"] == "handbook.pdf")
    assert handbook["chunk_count"] == 2  # one per page: chunks never cross a page break
    assert handbook["title"] == "Employee handbook" and handbook["format"] == "pdf"
    assert handbook["source"].startswith("file:///") and handbook["source"].endswith("/handbook.pdf")
    for key in ("doc_id", "page", "element_types", "char_start", "char_end", "content_hash", "ingested_at",
                "sensitivity", "doc_hash", "tokens"):
        assert key in handbook, key
    assert handbook["page"] == 1 and handbook["element_types"] == ["PageText"]
    assert store_call(config, "collection", name).documents == report.count("indexed")


def test_reingest_writes_nothing_and_a_changed_file_replaces_its_chunks(served, collection, corpus):
    name, _, config = collection
    before = store_call(config, "collection", name).points
    again = run_ingest(str(corpus[0]), name, config, progress=False)
    assert again.count("indexed") == 0 and again.count("unchanged") == 8 and again.chunks == 0
    assert store_call(config, "collection", name).points == before

    cafeteria = corpus[0] / "cafeteria.txt"
    original = cafeteria.read_bytes()
    cafeteria.write_text("Cafeteria\n\nThe cafeteria now opens at 8:15 and closes at 15:00.\n")
    try:
        changed = run_ingest(str(corpus[0]), name, config, progress=False)
        assert [f.path for f in changed.files if f.status == "indexed"] == ["cafeteria.txt"]
        assert store_call(config, "collection", name).points == before  # replaced, not added
        passages = httpx.post(served.v1 + "/retrieve", timeout=60, json={
            "collection": name, "query": "when does the cafeteria open", "top_k": 10}).json()["data"]
        cafeteria_texts = [p["text"] for p in passages if p["path"] == "cafeteria.txt"]
        assert len(cafeteria_texts) == 1 and "8:15" in cafeteria_texts[0]
    finally:
        cafeteria.write_bytes(original)
        run_ingest(str(corpus[0]), name, config, progress=False)


def test_known_questions_rank_their_document_first_over_http(served, collection):
    name = collection[0]
    for fact in FACTS:
        response = httpx.post(served.v1 + "/retrieve", timeout=60,
                              json={"collection": name, "query": fact.question, "top_k": 3})
        assert response.status_code == 200, response.text
        top = response.json()["data"][0]
        assert top["path"] == fact.file, (fact.question, [p["path"] for p in response.json()["data"]])
        assert fact.answer in " ".join(top["text"].split())
        if fact.page:
            assert top["page"] == fact.page


def test_filters_keep_confidential_material_apart(served, collection):
    name = collection[0]
    body = {"collection": name, "query": "salary band", "top_k": 5}
    everything = httpx.post(served.v1 + "/retrieve", json=body, timeout=60).json()["data"]
    assert everything[0]["path"] == "hr/salaries.md"
    public_only = httpx.post(served.v1 + "/retrieve", timeout=60,
                             json={**body, "filter": {"sensitivity": ["public", "internal"]}}).json()["data"]
    assert public_only and all(p["sensitivity"] != "confidential" for p in public_only)


def test_rag_chat_answers_from_the_sources_with_citations(served, collection):
    client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)
    question = [{"role": "user", "content": "How long is the refund window?"}]
    response = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=question, max_tokens=48, temperature=0,
        extra_body={"rag": {"collection": collection[0], "top_k": 3}})
    citations = response.model_extra["citations"]
    assert citations[0]["title"] == "Refund policy" and "45 days" in citations[0]["snippet"]
    assert {"index", "doc_id", "source", "page", "snippet", "score"} <= set(citations[0])
    assert "45" in response.choices[0].message.content  # the answer comes from the retrieved source
    assert response.usage.prompt_tokens > 100  # the sources really went into the prompt

    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=question, max_tokens=16, temperature=0, stream=True,
        extra_body={"rag": {"collection": collection[0], "top_k": 3}})
    chunks = list(stream)
    assert chunks[0].model_extra["citations"][0]["title"] == "Refund policy"

    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=question,
                                       extra_body={"rag": {"collection": "no-such-kb"}})
    assert exc.value.body["code"] == "collection_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=question,
                                       extra_body={"rag": {"collection": collection[0], "top_k": 0}})
    assert exc.value.body["param"] == "rag.top_k"  # checked with the request's schema, to the field


def test_uploads_over_http(served, collection):
    name = collection[0]
    url = f"{served.v1}/collections/{name}/documents"
    note = b"# Travel\n\nTrain tickets are reimbursed up to 200 euros per trip.\n"
    first = httpx.post(url, files={"file": ("travel.md", note, "text/markdown")}, timeout=120)
    assert first.status_code == 201 and first.json()["status"] == "indexed", first.text
    assert first.json()["chunks"] == 1 and first.json()["sensitivity"] == "internal"
    again = httpx.post(url, files={"file": ("travel.md", note, "text/markdown")}, timeout=120)
    assert again.status_code == 200 and again.json()["status"] == "unchanged"
    scan = httpx.post(url, files={"file": ("memo.pdf", good_files()["scanned_memo.pdf"], "application/pdf")},
                      data={"sensitivity": "confidential"}, timeout=120)
    assert scan.status_code == 201 and scan.json()["ocr_pages"] == 1 and scan.json()["sensitivity"] == "confidential"
    top = httpx.post(served.v1 + "/retrieve", timeout=60, json={
        "collection": name, "query": "how much are train tickets reimbursed"}).json()["data"][0]
    assert top["source"] == f"upload://{name}/travel.md"

    locked = httpx.post(url, files={"file": ("locked.pdf", b"%PDF-1.4 nonsense", "application/pdf")}, timeout=60)
    assert locked.status_code == 400 and locked.json()["error"]["code"] == "corrupt"
    odd = httpx.post(url, files={"file": ("data.xyz", b"123", "application/octet-stream")}, timeout=60)
    assert odd.status_code == 415 and odd.json()["error"]["code"] == "unsupported_type"
    missing = httpx.post(f"{served.v1}/collections/nope/documents", files={"file": ("a.md", note)}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "collection_not_found"

    doc_id = first.json()["doc_id"]
    deleted = httpx.delete(f"{url}/{doc_id}", timeout=60)
    assert deleted.status_code == 200 and deleted.json()["chunks"] == 1
    assert httpx.delete(f"{url}/{doc_id}", timeout=60).status_code == 404
    listed = httpx.get(served.v1 + "/collections", timeout=60).json()["data"]
    assert name in {c["name"] for c in listed}


def test_ingest_labels_files_with_the_collections_default_as_uploads_do(served, tmp_path):
    """A collection created confidential keeps what the command line ingests into it confidential (it
    took the ingest config's default, internal, while an upload to it took the collection's)."""
    name = f"conf-{uuid.uuid4().hex[:8]}"
    created = httpx.post(served.v1 + "/collections", json={"name": name, "default_sensitivity": "confidential"},
                         timeout=60)
    assert created.status_code == 201, created.text
    config = IngestConfig.load(ROOT / "configs" / "ingest.yaml")
    (tmp_path / "plans.md").write_text("# Plans\n\nThe merger closes in March.\n")
    try:
        report = run_ingest(str(tmp_path), name, config, progress=False)
        assert [f.sensitivity for f in report.files] == ["confidential"]
        assert {d["sensitivity"] for d in store_call(config, "documents", name).values()} == {"confidential"}
    finally:
        store_call(config, "drop_collection", name)


def test_ocr_endpoint(served):
    png = good_files()["receipt.png"]
    response = httpx.post(served.v1 + "/ocr", files={"file": ("receipt.png", png, "image/png")}, timeout=120)
    assert response.status_code == 200, response.text
    page = response.json()["pages"][0]
    assert [line["text"] for line in page["lines"]] == ["Finance update", "Quarterly revenue reached 12 million euros."]
    assert all(len(line["box"]) == 4 and line["confidence"] > 80 for line in page["lines"])
    pdf = httpx.post(served.v1 + "/ocr", timeout=120,
                     files={"file": ("memo.pdf", good_files()["scanned_memo.pdf"], "application/pdf")}).json()
    assert "garage access code is 4417" in pdf["text"] and pdf["pages"][0]["page"] == 1
    text = httpx.post(served.v1 + "/ocr", files={"file": ("a.txt", b"hello", "text/plain")}, timeout=60)
    assert text.status_code == 415


def test_pipeline_into_qdrant_client_local_mode(served, tmp_path, corpus):
    """The server path's API (qdrant-client), run in its local mode."""
    config = IngestConfig.load(ROOT / "configs" / "ingest.yaml",
                               {"store": StoreConfig(backend="qdrant", path=str(tmp_path / "qdrant")).model_dump()})
    report = run_ingest(str(corpus[0]), "kb", config, progress=False)
    assert report.count("indexed") == 8 and report.count("refused") == 7
    docs = store_call(config, "documents", "kb")
    assert {d["path"] for d in docs.values()} == {p for p, code in corpus[1].items() if code is None}


def test_the_ingest_command_reports_partial_success(corpus, tmp_path, data_dir):
    """`ray-app ingest` as a user runs it: its own local Ray, a progress-less log, exit status 2."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(data_dir.models)
    report = tmp_path / "report.jsonl"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray-app"), "ingest", str(corpus[0]), "--collection", "cli",
         "--data-dir", str(data), "--report", str(report), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["status"], summary["indexed"], summary["refused"]) == ("partial", 8, 7)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    refused = {line["path"]: line["code"] for line in lines if line["status"] == "refused"}
    assert refused == {p: c for p, c in corpus[1].items() if c is not None}
    assert "refused locked.pdf: [encrypted]" in result.stderr.replace("\n", " ") or "locked.pdf" in result.stderr
