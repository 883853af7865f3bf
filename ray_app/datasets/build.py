"""A training set from a collection, as one Ray Data job: chunks -> domain -> teacher (summaries and
instruction pairs) -> quality filters -> OpenAI chat fine-tuning JSONL with provenance, and a report.

    read     the collection's chunks through the cluster's store actor (the server's own collections)
    domain   each document's domain from its keywords (``DatasetConfig.domains``; ``general`` otherwise)
    teacher  a Ray Data actor stage: a summary per document and ``pairs_per_chunk`` question-and-answer
             pairs per chunk, written by the teacher over the server's API, many requests in flight
    filter   structure, length, language, grounding in the source chunk, exact and near duplicates
    write    one JSON line per record: ``{"messages": [...], "metadata": {doc_id, chunk, source,
             sensitivity, domain, kind}}``, and ``<out>.report.json``: what each filter removed and why

Captured conversations (``conversations=``) join the same filters (without grounding: a chat has no
source chunk) and the same output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ray_app.datasets.config import DatasetConfig, DomainRule
from ray_app.datasets.filters import Record, apply_filters

__all__ = ["DatasetReport", "DomainDetector", "TeacherStage", "build_dataset", "read_conversations"]

logger = logging.getLogger("ray_app.datasets")
_WORD = re.compile(r"[^\W\d_]+")


class DomainDetector:
    """A document's domain: the configured domain whose keywords it hits most (ties: config order)."""

    def __init__(self, rules: dict[str, DomainRule]):
        self.rules = {name: (frozenset(k.lower() for k in rule.keywords), rule.min_score)
                      for name, rule in rules.items()}

    def detect(self, text: str) -> tuple[str, dict[str, int]]:
        words = Counter(_WORD.findall(text.lower()))
        scores = {name: sum(words[k] for k in keywords) for name, (keywords, _) in self.rules.items()}
        best = max(scores, key=lambda n: scores[n], default=None)
        if best is None or scores[best] < self.rules[best][1]:
            return "general", scores
        return best, scores


class TeacherStage:
    """Ray Data stage: rows of ``kind`` (summary|pair), ``text``, ``title``, ``sensitivity`` -> the
    teacher's ``question``/``answer`` (or the ``error`` that made there be none), a batch at a time
    with the teacher's requests in flight together."""

    def __init__(self, teacher_config: dict[str, Any], pairs_per_chunk: int):
        from ray_app.datasets.config import TeacherConfig
        from ray_app.datasets.teacher import Teacher

        self.teacher = Teacher(TeacherConfig.model_validate(teacher_config))
        self.pairs_per_chunk = pairs_per_chunk
        self._loop = asyncio.new_event_loop()

    async def _one(self, kind: str, text: str, title: str, sensitivity: str) -> tuple[str, str, str]:
        try:
            if kind == "summary":
                summary = await self.teacher.summary(title, text, sensitivity)
                return f"What is the document {title!r} about?", summary, ""
            result = await self.teacher.pair(text, sensitivity)
            return ("", "", result) if isinstance(result, str) else (*result, "")
        except Exception as e:  # one failed request costs its record, not the run
            return "", "", f"teacher request failed: {type(e).__name__}: {e}"[:300]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        async def everything():
            return await asyncio.gather(*(self._one(k, t, ti, s) for k, t, ti, s in
                                          zip(batch["kind"], batch["text"], batch["title"], batch["sensitivity"])))

        # one loop for the actor's life: the teacher's client and its connection pool belong to it
        results = self._loop.run_until_complete(everything())
        out = dict(batch)
        for i, name in enumerate(("question", "answer", "error")):
            column = np.empty(len(results), dtype=object)
            column[:] = [r[i] for r in results]
            out[name] = column
        return out


@dataclass
class DatasetReport:
    collection: str | None
    out: str
    documents: int = 0
    chunks: int = 0
    domains: dict[str, int] = field(default_factory=dict)  # documents per domain
    generated: int = 0  # records the teacher (and the captures) produced
    teacher_errors: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    kept_fraction: dict[str, float] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    conversations: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    pairs_per_s: float = 0.0
    sensitivities: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_conversations(root: Path) -> list[Record]:
    """Captured chats (``ray_app.datasets.capture``) as records."""
    records = []
    for path in sorted(Path(root).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.append(Record("conversation", item["messages"], item.get("metadata", {}) | {"kind": "conversation"}))
    return records


def _chunk_rows(chunks: list[dict[str, Any]], config: DatasetConfig) -> tuple[list[dict[str, Any]], dict, Counter]:
    by_doc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for chunk in chunks:
        by_doc[chunk["doc_id"]].append(chunk)
    detector = DomainDetector(config.domains)
    rows, domains, per_domain = [], {}, Counter()
    for doc_id, parts in by_doc.items():
        parts.sort(key=lambda c: c.get("chunk_index", 0))
        text = "\n\n".join(p.get("text", "") for p in parts)
        domain, _ = detector.detect(text)
        domains[doc_id] = domain
        per_domain[domain] += 1
        first = parts[0]
        title = first.get("title") or first.get("path") or first.get("source") or doc_id
        sensitivity = max((p.get("sensitivity") or "internal" for p in parts),
                          key=("public", "internal", "confidential").index)
        base = {"doc_id": doc_id, "title": title, "source": first.get("source", ""), "domain": domain}
        if config.summaries:
            rows.append(base | {"kind": "summary", "chunk": -1, "text": text, "sensitivity": sensitivity})
        for part in parts:
            for _ in range(config.pairs_per_chunk):
                rows.append(base | {"kind": "pair", "chunk": int(part.get("chunk_index", 0)), "text": part["text"],
                                    "sensitivity": part.get("sensitivity") or "internal"})
    return rows, domains, per_domain


def _record(row: dict[str, Any], system: str | None) -> Record:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    metadata = {k: row[k] for k in ("doc_id", "chunk", "source", "sensitivity", "domain", "kind")}
    return Record(row["kind"], messages, metadata, source=row["text"])


def build_dataset(collection: str | None, config: DatasetConfig, out: str | Path, *,
                  conversations: str | Path | None = None, address: str | None = None,
                  progress: bool = True) -> DatasetReport:
    """Build the training set; writes ``out`` (JSONL) and ``out`` + ``.report.json``."""
    import ray

    from ray_app.cluster import Demand, init_ray, share_cpus

    started = time.perf_counter()
    out = Path(out)
    report = DatasetReport(collection, str(out))
    records: list[Record] = []
    if collection is not None:
        from ray.data import ActorPoolStrategy, DataContext

        from ray_app.documents.store_actor import get_store

        init_ray(address)
        context = DataContext.get_current()
        context.enable_progress_bars = progress
        context.use_ray_tqdm = False
        store = get_store(config.store, config.paths)
        chunks = ray.get(store.chunks.remote(collection, config.max_chunks))
        rows, _, per_domain = _chunk_rows(chunks, config)
        report.documents, report.chunks, report.domains = len({r["doc_id"] for r in rows}), len(chunks), dict(per_domain)
        if rows:
            cpus = share_cpus("dataset build", [Demand("teacher", 1, 0.5)], config.cluster_share)["teacher"]
            teacher_started = time.perf_counter()
            dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 8, 32))).map_batches(
                TeacherStage, fn_constructor_kwargs={"teacher_config": config.teacher.model_dump(),
                                                     "pairs_per_chunk": config.pairs_per_chunk},
                compute=ActorPoolStrategy(size=1), num_cpus=cpus, batch_size=max(config.teacher.concurrency * 2, 1))
            produced = dataset.take_all()
            report.teacher_seconds = round(time.perf_counter() - teacher_started, 2)
            for row in produced:
                if row["error"]:
                    report.teacher_errors += 1
                    report.removed["teacher"] = report.removed.get("teacher", 0) + 1
                    shown = report.examples.setdefault("teacher", [])
                    if len(shown) < 3:
                        shown.append(row["error"])
                    continue
                records.append(_record(row, config.system_prompt))
    if conversations is not None:
        captured = read_conversations(Path(conversations))
        report.conversations = len(captured)
        records += captured
    report.generated = len(records) + report.teacher_errors
    kept, filtered = apply_filters(records, config.filters)
    report.kept = len(kept)
    report.removed |= filtered.removed
    report.kept_fraction = filtered.kept_fraction()
    report.examples |= filtered.examples
    report.sensitivities = dict(Counter(r.metadata.get("sensitivity", "internal") for r in kept))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for r in kept:
            f.write(json.dumps(r.training_line()) + "\n")
    report.seconds = round(time.perf_counter() - started, 2)
    made = sum(1 for r in records if r.kind in ("pair", "summary")) + report.teacher_errors
    report.pairs_per_s = round(made / report.teacher_seconds, 3) if report.teacher_seconds else 0.0
    Path(str(out) + ".report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
