"""The dataset builder's plain parts: domains, quality filters with their reasons, the teacher stage
over a real OpenAI-protocol server (loopback), captured conversations, and fitting jobs into the CPUs
a running server leaves free."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_app.cluster import Demand, fit
from ray_app.datasets.build import DomainDetector, TeacherStage, _chunk_rows, build_dataset
from ray_app.datasets.config import DatasetConfig, FilterConfig
from ray_app.datasets.filters import FILTERS, Record, apply_filters, grounding, is_english


def pair(q: str, a: str, source: str | None = None, **meta) -> Record:
    return Record("pair", [{"role": "user", "content": q}, {"role": "assistant", "content": a}], meta, source)


def test_domains_follow_their_keywords():
    detector = DomainDetector(DatasetConfig().domains)
    assert detector.detect("The contract's liability clause and the warranty terms.")[0] == "legal"
    assert detector.detect("Reset your password, then configure the server and deploy.")[0] == "technical"
    assert detector.detect("Each invoice lists the payment, the tax and the refund.")[0] == "financial"
    assert detector.detect("The patient's diagnosis and treatment plan.")[0] == "medical"
    assert detector.detect("We met for lunch by the river.")[0] == "general"


def test_every_filter_removes_what_it_should_and_says_why():
    source = "The refund window is 45 days from delivery; refunds go to the original card."
    records = [
        pair("How long is the refund window?", "The refund window is 45 days.", source),  # kept
        pair("How long is the refund window?", "The refund window is 45 days.", source),  # exact duplicate
        pair("How long is the refunds window?", "The refund window is 45 days.", source),  # near duplicate
        pair("How long is the refund window?", "Bananas grow on tall tropical plants quickly.", source),  # ungrounded
        pair("Wie lange ist das Rückgaberecht für die Kunden in dem Laden?", "Das ist nicht der Fall und die Frist.",
             source),  # not English
        pair("Why?", "The refund window is 45 days.", source),  # question too short
        Record("pair", [{"role": "assistant", "content": "x"}], {}, source),  # no user turn
    ]
    kept, report = apply_filters(records, FilterConfig())
    assert [r.question for r in kept] == ["How long is the refund window?"]
    assert report.removed == {"structure": 1, "length": 1, "language": 1, "grounded": 1, "duplicate": 1,
                              "near_duplicate": 1}
    assert all(report.examples[name] for name in report.removed)
    assert "45 days" not in report.examples["grounded"][0].split("->")[0]
    assert list(report.kept_fraction()) == list(FILTERS)
    assert report.kept_fraction()["structure"] == pytest.approx(6 / 7, abs=1e-4)
    assert grounding("forty five days", "The window is forty five days") == 1.0 and is_english("hello there")


def test_near_duplicates_are_found_among_many_records_without_comparing_every_pair():
    import random

    rng = random.Random(0)
    words = "renewal notice term party clause fee delivery refund account invoice audit notice court".split()
    texts = [" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randrange(10**9):09d}" for _ in range(300)]
    records = [pair(f"What does the agreement say: {t}?", f"It says {t}.") for t in texts]
    records.append(pair(f"What does the agreement say: {texts[7]} too?", f"It says {texts[7]}."))  # a near copy
    kept, report = apply_filters(records, FilterConfig(min_grounding=0, language=None, near_duplicate_jaccard=0.85))
    assert report.removed == {"near_duplicate": 1} and len(kept) == 300


def test_chunks_become_summary_and_pair_rows_with_their_provenance():
    chunks = [{"doc_id": "d1", "chunk_index": i, "text": f"part {i} of the contract clause", "title": "Terms",
               "source": "file:///terms.md", "sensitivity": "confidential" if i else "internal"} for i in range(2)]
    rows, domains, per_domain = _chunk_rows(chunks, DatasetConfig(pairs_per_chunk=2))
    assert [r["kind"] for r in rows] == ["summary", "pair", "pair", "pair", "pair"]
    assert rows[0]["sensitivity"] == "confidential"  # a document is as sensitive as its most sensitive chunk
    assert {r["chunk"] for r in rows[1:]} == {0, 1} and per_domain == {"legal": 1} or per_domain == {"general": 1}


@pytest.fixture(scope="module")
def teacher_server():
    from tests.router_servers import OpenAIServer

    server = OpenAIServer(json.dumps({"question": "How long is the refund window?",
                                      "answer": "The refund window is 45 days."})).start()
    yield server
    server.stop()


def test_the_teacher_stage_asks_the_server_and_marks_confidential_chunks(teacher_server):
    config = DatasetConfig.load(overrides={"teacher.endpoint": teacher_server.url + "/v1", "teacher.model": "m"})
    stage = TeacherStage(config.teacher.model_dump(), 1)
    batch = {"kind": np.array(["pair", "pair", "summary"], dtype=object),
             "text": np.array(["The refund window is 45 days."] * 3, dtype=object),
             "title": np.array(["Refunds"] * 3, dtype=object),
             "sensitivity": np.array(["internal", "confidential", "internal"], dtype=object)}
    out = stage(batch)
    assert list(out["question"][:2]) == ["How long is the refund window?"] * 2 and not any(out["error"])
    assert out["question"][2] == "What is the document 'Refunds' about?"
    sent = teacher_server.requests[-3:]
    by_text = {r.headers.get("x-confidential") for r in sent}
    assert by_text == {None, "true"}  # only the confidential chunk's request says so
    pair_request = next(r for r in sent if "response_format" in r.body)
    assert pair_request.body["temperature"] == 0 and pair_request.body["seed"] == 0
    assert pair_request.body["response_format"]["json_schema"]["schema"]["required"] == ["question", "answer"]


def test_captured_conversations_build_a_training_file(tmp_path):
    from ray_app.datasets.capture import CaptureLog

    log = CaptureLog(tmp_path / "captures")
    log.write([{"role": "user", "content": "How do I reset my password?"}], "Open Settings, then Security.",
              {"key_id": "k1", "sensitivity": "internal"})
    log.write([{"role": "user", "content": "How do I reset my password?"}], "Open Settings, then Security.",
              {"key_id": "k1", "sensitivity": "internal"})
    report = build_dataset(None, DatasetConfig(), tmp_path / "out.jsonl", conversations=tmp_path / "captures")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report.conversations == 2 and report.kept == 1 and report.removed == {"duplicate": 1}
    assert lines[0]["messages"][-1] == {"role": "assistant", "content": "Open Settings, then Security."}
    assert lines[0]["metadata"]["kind"] == "conversation" and lines[0]["metadata"]["key_id"] == "k1"
    assert json.loads((tmp_path / "out.jsonl.report.json").read_text())["kept"] == 1


def test_jobs_fit_into_the_cpus_a_running_server_leaves_free():
    demands = [Demand("parse", 2, 0.5), Demand("ocr", 1, 1.0), Demand("embed", 1, 1.0)]
    fitted = fit(demands, free=0.6)
    assert sum(d.total for d in fitted) <= 0.6 + 1e-9
    assert [d.cpus for d in fitted] == [0.1, 0.2, 0.2]  # the proportions are kept
    assert fit(demands, free=8.0) == demands  # room enough: untouched
    assert fit(demands, free=0.6, share="strict") == demands  # an autoscaling cluster: wait instead
    assert min(d.cpus for d in fit(demands, free=0.0)) > 0  # never 0: Ray refuses some 0-CPU workers
