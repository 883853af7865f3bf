"""The ingestion pipeline on Ray Data, one chain: read -> parse -> OCR -> chunk -> embed -> write.

Every stage is a callable class over a plain object (``DocumentParser``, ``TesseractOCR``,
``TokenChunker``, ``SentenceEmbedder``) and runs as a pool of actors (chunking runs inside the
embedding actors, which hold the tokenizer it counts with), so on a GPU cluster the OCR and
embedding pools take GPU workers by configuration alone. A file a stage cannot handle becomes a
*refused* row with its reason and flows on untouched; nothing a single file does stops the run.

Writing: an embedded Qdrant shard allows one writer, so the driver gathers each document's chunks
from the stream and sends complete documents to the one ``VectorStoreActor``, which replaces the
document's previous chunks (chunk 0 last). Unchanged files are recognised by their content hash
before they are parsed and cost nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np

from ray_app.documents.chunk import Chunk, TokenChunker
from ray_app.documents.config import IngestConfig, OCRConfig, Sensitivity
from ray_app.documents.ocr import TesseractOCR
from ray_app.documents.parse import DocumentParser, Element, ParsedDocument, RefusedFile
from ray_app.documents.processing import DocMeta, build_records, ocr_elements
from ray_app.documents.report import FileOutcome, IngestReport
from ray_app.documents.sources import FileTask, content_hash, list_files, read_bytes

logger = logging.getLogger("ray_app.ingest")

# Row status as it flows down the chain; the last three end a file's journey.
PARSED, CHUNK, INDEXED, UNCHANGED, RELABELLED, REFUSED = ("parsed", "chunk", "indexed", "unchanged", "relabelled",
                                                        "refused")


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def _columns(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for key in keys:
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[key] for row in rows]
        out[key] = column
    return out


DOC_KEYS = ("doc", "status", "elements", "ocr_pages", "data")
CHUNK_KEYS = ("doc", "status", "chunk", "text", "sparse")


def _refused(doc: dict, error: RefusedFile) -> dict[str, Any]:
    return {"doc": json.dumps({**doc, "code": error.code, "reason": error.message}), "status": REFUSED,
            "elements": "[]", "ocr_pages": "[]", "data": b""}


class ParseStage:
    """read + parse: a file's bytes to elements, or a refusal; unchanged files stop here."""

    def __init__(self, config: IngestConfig, fingerprint: str, known: dict[str, tuple[str, str]]):
        self.config = config
        self.fingerprint = fingerprint
        self.known = known
        self.parser = DocumentParser(config.ocr, config.limits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _columns([self.one(json.loads(row["task"])) for row in _rows(batch)], DOC_KEYS)

    def one(self, task: dict) -> dict[str, Any]:
        doc = {"doc_id": task["doc_id"], "source": task["uri"], "path": task["rel_path"],
               "sensitivity": task["sensitivity"], "doc_hash": ""}
        try:
            if task["size"] > self.config.max_file_bytes:
                raise RefusedFile("too_large", f"{task['size']} bytes is over the limit of "
                                               f"{self.config.max_file_bytes} bytes")
            try:
                data = read_bytes(task["uri"])
            except OSError as e:
                raise RefusedFile("read_error", f"could not read the file: {e}") from None
            doc["doc_hash"] = content_hash(data, self.fingerprint)
            known_hash, known_label = self.known.get(doc["doc_id"], (None, None))
            if known_hash == doc["doc_hash"]:
                # the same bytes: nothing to parse; a new label (a new sensitivity rule) is applied in place
                status = UNCHANGED if known_label == doc["sensitivity"] else RELABELLED
                return {"doc": json.dumps(doc), "status": status, "elements": "[]", "ocr_pages": "[]", "data": b""}
            parsed = self.parser.parse(task["rel_path"], data)
        except RefusedFile as e:
            return _refused(doc, e)
        except Exception as e:  # a parser crashing on one file must not take the batch down
            return _refused(doc, RefusedFile("parse_error", f"{type(e).__name__}: {e}"))
        doc |= {"format": parsed.format, "title": parsed.title, "page_count": parsed.page_count}
        return {"doc": json.dumps(doc), "status": PARSED,
                "elements": json.dumps([asdict(e) for e in parsed.elements]),
                "ocr_pages": json.dumps(parsed.ocr_pages), "data": data if parsed.ocr_pages else b""}


class OCRStage:
    """Pages without a text layer, and images, through Tesseract."""

    def __init__(self, config: IngestConfig):
        self.ocr = TesseractOCR(config.ocr, limits=config.limits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _columns([self.one(row) for row in _rows(batch)], DOC_KEYS)

    def one(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["status"] != PARSED:
            return row
        doc = json.loads(row["doc"])
        parsed = ParsedDocument(format=doc["format"], elements=[Element(**e) for e in json.loads(row["elements"])],
                                ocr_pages=json.loads(row["ocr_pages"]), page_count=doc["page_count"])
        try:
            elements = ocr_elements(parsed, row["data"], self.ocr)
        except RefusedFile as e:
            return _refused(doc, e)
        doc["ocr_pages"] = len(parsed.ocr_pages)
        return {**row, "doc": json.dumps(doc), "elements": json.dumps([asdict(e) for e in elements]), "data": b""}


class ChunkStage:
    """Elements to token chunks (the embedder's tokenizer) with their BM25 sparse vectors."""

    def __init__(self, embedder_path: str, max_tokens: int, overlap_tokens: int):
        from transformers import AutoTokenizer

        from ray_app.documents.sparse import SparseEncoder

        self.chunker = TokenChunker(AutoTokenizer.from_pretrained(embedder_path), max_tokens, overlap_tokens)
        self.sparse = SparseEncoder()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in _rows(batch):
            if row["status"] != PARSED:
                out.append({"doc": row["doc"], "status": row["status"], "chunk": "", "text": "", "sparse": ""})
                continue
            chunks = self.chunker.chunk([Element(**e) for e in json.loads(row["elements"])])
            if not chunks:
                doc = json.loads(row["doc"])
                out.append({"doc": json.dumps({**doc, "code": "no_text", "reason": "no text to index"}),
                            "status": REFUSED, "chunk": "", "text": "", "sparse": ""})
                continue
            for chunk in chunks:
                out.append({"doc": row["doc"], "status": CHUNK, "text": chunk.text,
                            "chunk": json.dumps({**asdict(chunk), "count": len(chunks)}),
                            "sparse": json.dumps(self.sparse.document(chunk.text))})
        return _columns(out, CHUNK_KEYS)


class EmbedStage:
    """Chunks (``ChunkStage``) and their dense vectors, in one actor: chunking needs the embedder's
    tokenizer anyway, and one process fewer per node saves a second of start-up and a copy of the
    rows between processes."""

    def __init__(self, embedder_path: str, device: str, num_threads: int | None, batch_size: int,
                 max_tokens: int, overlap_tokens: int):
        from ray_app.embedder import SentenceEmbedder

        self.chunk = ChunkStage(embedder_path, max_tokens, overlap_tokens)
        self.embedder = SentenceEmbedder(embedder_path, device=device, num_threads=num_threads, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.chunk(batch)
        texts = list(batch["text"])
        is_chunk = np.array([s == CHUNK for s in batch["status"]], dtype=bool)
        dense = np.zeros((len(texts), self.embedder.dimensions), dtype=np.float32)
        if is_chunk.any():
            dense[is_chunk] = self.embedder.encode([t for t, c in zip(texts, is_chunk) if c])
        return {**batch, "dense": dense}


def ingest_fingerprint(embedder: str, max_tokens: int, overlap: int, ocr: OCRConfig) -> str:
    """The settings that shape a document's chunks: changing one re-ingests every document."""
    return json.dumps({"embedder": embedder, "max_tokens": max_tokens, "overlap": overlap,
                       "ocr": ocr.model_dump(exclude={"threads"}), "v": 1}, sort_keys=True)


def build_dataset(tasks: list[FileTask], config: IngestConfig, embedder_path: str, device: str,
                  max_tokens: int, overlap: int, fingerprint: str, known: dict[str, tuple[str, str]]):
    import ray
    from ray.data import ActorPoolStrategy

    from ray_app.cluster import Demand, share_cpus

    stages = {"parse": config.parse, "ocr": config.ocr_stage, "embed": config.embed}
    # every stage's actors must be placed at once: fitted to what the cluster has free (the Serve app's share)
    cpus = share_cpus("ingest", [Demand(n, r.concurrency, r.num_cpus) for n, r in stages.items()], config.cluster_share)

    def stage(name: str) -> dict[str, Any]:
        resources = stages[name]
        return {"compute": ActorPoolStrategy(size=resources.concurrency), "batch_format": "numpy",
                **resources.map_batches_kwargs() | {"num_cpus": cpus[name]}}

    items = [{"task": json.dumps({**asdict(t), "doc_id": t.doc_id})} for t in tasks]
    return (
        ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
        .map_batches(ParseStage, fn_constructor_kwargs={"config": config, "fingerprint": fingerprint,
                                                        "known": known}, **stage("parse"))
        .map_batches(OCRStage, fn_constructor_kwargs={"config": config}, **stage("ocr"))
        .map_batches(EmbedStage, fn_constructor_kwargs={"embedder_path": embedder_path, "device": device,
                                                        "num_threads": config.embedder_threads,
                                                        "batch_size": config.embed.batch_size,
                                                        "max_tokens": max_tokens, "overlap_tokens": overlap},
                     **stage("embed"))
    )


class DocumentAssembler:
    """Gathers a document's chunks from the stream; yields it once all of them have arrived."""

    def __init__(self):
        self._pending: dict[str, list[tuple[Chunk, np.ndarray, tuple]]] = defaultdict(list)

    def add(self, row: dict[str, Any]) -> tuple[DocMeta, list[tuple]] | None:
        """(document, [(chunk, dense vector, sparse vector)]) when ``row`` completes its document."""
        doc = json.loads(row["doc"])
        chunk_data = json.loads(row["chunk"])
        count = chunk_data.pop("count")
        chunk = Chunk(**chunk_data)
        parts = self._pending[doc["doc_id"]]
        parts.append((chunk, row["dense"], tuple(json.loads(row["sparse"]))))
        if len(parts) < count:
            return None
        del self._pending[doc["doc_id"]]
        parts.sort(key=lambda p: p[0].index)
        return DocMeta(**{k: doc.get(k) for k in DocMeta.__dataclass_fields__ if k in doc}), parts

    @property
    def incomplete(self) -> list[str]:
        return list(self._pending)


def _outcome(doc: dict, status: str, chunks: int = 0) -> FileOutcome:
    return FileOutcome(source=doc["source"], path=doc["path"], status=status, code=doc.get("code"),
                       reason=doc.get("reason"), doc_id=doc["doc_id"], chunks=chunks,
                       pages=doc.get("page_count"), ocr_pages=doc.get("ocr_pages") or 0,
                       sensitivity=doc.get("sensitivity"))


def run_ingest(source: str, collection: str, config: IngestConfig, sensitivity: Sensitivity | None = None,
               address: str | None = None, progress: bool = True) -> IngestReport:
    """Ingest a folder, file or s3:// prefix into ``collection``; returns the per-file report."""
    import ray

    from ray_app.documents.store_actor import get_store
    from ray_app.embedder import SentenceEmbedder
    from ray_app.models.resolve import resolve_source

    started = time.perf_counter()
    paths = config.paths
    embedder_path = resolve_source(config.embedder, paths)
    tasks = list_files(source, config, sensitivity)
    from ray_app.cluster import init_ray

    init_ray(address)  # the server's cluster when one runs: the collection is written where it is served
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.enable_rich_progress_bars = progress
    context.use_ray_tqdm = False

    probe = SentenceEmbedder(embedder_path)  # dimensions and what the model reads, before anything runs
    max_tokens, overlap = config.chunking.resolve(probe.max_tokens, probe.tokenizer.num_special_tokens_to_add())
    dimensions = probe.dimensions
    del probe
    fingerprint = ingest_fingerprint(config.embedder, max_tokens, overlap, config.ocr)

    store = get_store(config.store, paths)
    ray.get(store.ensure_collection.remote(collection, dimensions, config.embedder))
    known = {doc_id: (p["doc_hash"], p.get("sensitivity")) for doc_id, p in
             ray.get(store.documents.remote(collection)).items()}

    report = IngestReport(collection=collection)
    if not tasks:
        report.seconds = time.perf_counter() - started
        return report
    dataset = build_dataset(tasks, config, embedder_path, "cuda" if config.embed.num_gpus > 0 else "cpu",
                            max_tokens, overlap, fingerprint, known)
    assembler = DocumentAssembler()
    in_flight: list = []
    for row in _iter_rows(dataset):
        if report.first_result_s is None:
            report.first_result_s = time.perf_counter() - started
        doc = json.loads(row["doc"])
        if row["status"] == CHUNK:
            complete = assembler.add(row)
            if complete is None:
                continue
            meta, parts = complete
            chunks = [p[0] for p in parts]
            records = build_records(meta, chunks, np.stack([p[1] for p in parts]), [p[2] for p in parts])
            in_flight.append(store.replace_document.remote(collection, meta.doc_id, records))
            report.files.append(_outcome(doc, INDEXED, len(chunks)))
            if len(in_flight) > 8:  # back-pressure: the writer keeps up or the stream waits
                ray.get(in_flight.pop(0))
        else:
            if row["status"] in (UNCHANGED, RELABELLED):  # a replace that crashed midway left other versions
                in_flight.append(store.prune.remote(collection, doc["doc_id"], doc["doc_hash"]))
            if row["status"] == RELABELLED:
                in_flight.append(store.set_sensitivity.remote(collection, doc["doc_id"], doc["sensitivity"]))
            report.files.append(_outcome(doc, row["status"]))
    ray.get(in_flight)
    from ray_app.metrics import record_ingest

    for outcome in report.files:
        record_ingest(collection, outcome.status, outcome.chunks)
    if assembler.incomplete:
        raise RuntimeError(f"documents with missing chunks at the end of the stream: {assembler.incomplete}")
    ray.get(store.flush.remote(collection))
    report.seconds = time.perf_counter() - started
    return report


def _iter_rows(dataset) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        yield from _rows(batch)
