"""The ingestion pipeline on Ray Data, one chain: read -> parse -> OCR -> chunk -> embed -> write.

Every stage is a callable class that runs, row by row, the steps uploads run too
(``processing.DocumentSteps``, ``ocr_elements``) with its engine (``TesseractOCR``,
``SentenceEmbedder``), as a pool of actors (chunking runs inside the embedding actors, which hold the
tokenizer it counts with), so on a GPU cluster the OCR and embedding pools take GPU workers by
configuration alone. Rows carry plain columns (strings, ints, bytes, lists, dicts). A file a step
refuses becomes a *refused* row with its code and reason and flows on untouched; nothing a single
file does stops the run.

Writing: an embedded Qdrant shard allows one writer, so the driver gathers each document's chunks
from the stream and sends complete documents to the one ``VectorStoreActor``, which replaces the
document's previous chunks (chunk 0 last). Unchanged files are recognised by their content hash
before they are parsed and cost nothing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ray_app.documents.chunk import Chunk
from ray_app.documents.config import IngestConfig, Sensitivity
from ray_app.documents.ocr import TesseractOCR
from ray_app.documents.parse import Element, ParsedDocument, RefusedFile
from ray_app.documents.processing import DocMeta, DocumentSettings, DocumentSteps, build_records, ocr_elements
from ray_app.documents.report import IngestReport
from ray_app.documents.sources import FileTask, list_files, read_bytes

# Row status as it flows down the chain; the last three end a file's journey.
PARSED, CHUNK, INDEXED, UNCHANGED, RELABELLED, REFUSED = ("parsed", "chunk", "indexed", "unchanged", "relabelled",
                                                        "refused")
# The columns of a document's row (parse -> OCR -> embed): ``doc`` is its ``DocMeta`` as a dict,
# ``elements`` its ``Element``s as dicts; ``data`` its bytes while OCR still needs them.
DOC_COLUMNS = ("doc", "status", "code", "reason", "elements", "ocr_pages", "data")
# The columns of a chunk's row (embed -> the driver), one per chunk; refusals and unchanged
# documents pass as one row with an empty ``chunk``.
CHUNK_COLUMNS = ("doc", "status", "code", "reason", "chunk", "chunk_count", "sparse_indices", "sparse_values")


def _rows(batch: pa.Table) -> list[dict[str, Any]]:
    """A batch's rows as Python values. Arrow's own conversion keeps an int an int; its numpy one turns an
    int field that is null in some row of the batch (a PDF's page beside a Markdown file's) into a float."""
    return batch.to_pylist()


def _columns(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {key: np.empty(len(rows), dtype=object) for key in keys}
    for i, row in enumerate(rows):
        for key in keys:
            out[key][i] = row[key]  # one by one: numpy would broadcast a column of equal-length lists
    return out


def _doc_row(meta: DocMeta, status: str, parsed: ParsedDocument | None = None, data: bytes = b"") -> dict[str, Any]:
    return {"doc": asdict(meta), "status": status, "code": "", "reason": "",
            "elements": [asdict(e) for e in parsed.elements] if parsed else [],
            "ocr_pages": parsed.ocr_pages if parsed else [], "data": data}


def _refused(row: dict[str, Any], error: RefusedFile) -> dict[str, Any]:
    return {**row, "status": REFUSED, "code": error.code, "reason": error.message, "elements": [], "ocr_pages": [],
            "data": b""}


def _parsed(row: dict[str, Any]) -> ParsedDocument:
    doc = row["doc"]
    return ParsedDocument(format=doc["format"], elements=[Element(**e) for e in row["elements"]],
                          ocr_pages=row["ocr_pages"], page_count=doc["page_count"], title=doc["title"])


class ParseStage:
    """size check + read + version + parse: a file's bytes to elements, or a refusal; files the
    collection holds already stop here."""

    def __init__(self, settings: DocumentSettings, known: dict[str, tuple[str, str]]):
        self.steps = DocumentSteps(settings)
        self.known = known

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return _columns([self.one(task) for task in _rows(batch)], DOC_COLUMNS)

    def one(self, task: dict[str, Any]) -> dict[str, Any]:
        meta = DocMeta(task["doc_id"], task["uri"], task["rel_path"], task["sensitivity"])
        try:
            self.steps.check_size(task["size"])  # before the bytes are read
            try:
                data = read_bytes(task["uri"])
            except OSError as e:
                raise RefusedFile("read_error", f"could not read the file: {e}") from None
            if reused := self.steps.version(meta, data, self.known.get(meta.doc_id)):
                return _doc_row(meta, reused)
            parsed = self.steps.parse(meta, data)
        except RefusedFile as e:
            return _refused(_doc_row(meta, REFUSED), e)
        return _doc_row(meta, PARSED, parsed, data if parsed.ocr_pages else b"")


class OCRStage:
    """Pages without a text layer, and images, through Tesseract (``ocr_elements``)."""

    def __init__(self, settings: DocumentSettings):
        self.ocr = TesseractOCR(settings.ocr, limits=settings.limits)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return _columns([self.one(row) for row in _rows(batch)], DOC_COLUMNS)

    def one(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["status"] != PARSED or not row["ocr_pages"]:
            return row
        try:
            elements = ocr_elements(_parsed(row), row["data"], self.ocr)
        except RefusedFile as e:
            return _refused(row, e)
        return {**row, "elements": [asdict(e) for e in elements], "data": b""}


class EmbedStage:
    """Chunks with their sparse vectors (``DocumentSteps.chunk``), then their dense vectors, in one
    actor: chunks are counted in the embedder's own tokenizer, and one process fewer per node saves a
    second of start-up and a copy of the rows between processes."""

    def __init__(self, settings: DocumentSettings, embedder_path: str, device: str, num_threads: int | None,
                 batch_size: int):
        from ray_app.documents.embedder import SentenceEmbedder

        self.embedder = SentenceEmbedder(embedder_path, device=device, num_threads=num_threads, batch_size=batch_size)
        self.steps = DocumentSteps(settings, self.embedder.tokenizer)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = [out for row in _rows(batch) for out in self.chunks(row)]
        texts = [row["chunk"]["text"] for row in rows if row["status"] == CHUNK]
        dense = np.zeros((len(rows), self.embedder.dimensions), dtype=np.float32)
        if texts:
            dense[np.array([row["status"] == CHUNK for row in rows])] = self.embedder.encode(texts)
        return {**_columns(rows, CHUNK_COLUMNS), "dense": dense}

    def chunks(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per chunk of a parsed document; any other row as it came."""
        out = {**{k: row[k] for k in ("doc", "status", "code", "reason")}, "chunk": {}, "chunk_count": 0,
               "sparse_indices": [], "sparse_values": []}
        if row["status"] != PARSED:
            return [out]
        try:
            chunks = self.steps.chunk(_parsed(row))
        except RefusedFile as e:
            return [{**out, "status": REFUSED, "code": e.code, "reason": e.message}]
        sparse = self.steps.sparse_vectors(chunks)
        return [{**out, "status": CHUNK, "chunk": asdict(chunk), "chunk_count": len(chunks),
                 "sparse_indices": indices, "sparse_values": values} for chunk, (indices, values) in zip(chunks, sparse)]


def build_dataset(tasks: list[FileTask], config: IngestConfig, settings: DocumentSettings, embedder_path: str,
                  device: str, known: dict[str, tuple[str, str]]):
    import ray
    from ray.data import ActorPoolStrategy

    from ray_app.cluster import Demand, share_cpus

    stages = {"parse": config.parse, "ocr": config.ocr_stage, "embed": config.embed}
    # every stage's actors must be placed at once: fitted to what the cluster has free (the Serve app's share)
    cpus = share_cpus("ingest", [Demand(n, r.concurrency, r.num_cpus) for n, r in stages.items()], config.cluster_share)

    def stage(name: str) -> dict[str, Any]:
        resources = stages[name]
        return {"compute": ActorPoolStrategy(size=resources.concurrency), "batch_format": "pyarrow",
                **resources.map_batches_kwargs() | {"num_cpus": cpus[name]}}

    items = [{**asdict(t), "doc_id": t.doc_id} for t in tasks]
    return (
        ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
        .map_batches(ParseStage, fn_constructor_kwargs={"settings": settings, "known": known}, **stage("parse"))
        .map_batches(OCRStage, fn_constructor_kwargs={"settings": settings}, **stage("ocr"))
        .map_batches(EmbedStage, fn_constructor_kwargs={"settings": settings, "embedder_path": embedder_path,
                                                        "device": device, "num_threads": config.embedder_threads,
                                                        "batch_size": config.embed.batch_size}, **stage("embed"))
    )


class DocumentAssembler:
    """Gathers a document's chunk rows from the stream; hands them over once all of them have arrived."""

    def __init__(self):
        self._pending: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, row: dict[str, Any]) -> tuple[list[Chunk], np.ndarray, list[tuple]] | None:
        """(chunks, dense vectors, sparse vectors) of the document when ``row`` completes it."""
        parts = self._pending[row["doc"]["doc_id"]]
        parts.append(row)
        if len(parts) < row["chunk_count"]:
            return None
        del self._pending[row["doc"]["doc_id"]]
        parts.sort(key=lambda part: part["chunk"]["index"])
        return ([Chunk(**p["chunk"]) for p in parts], np.stack([p["dense"] for p in parts]),
                [(p["sparse_indices"], p["sparse_values"]) for p in parts])

    @property
    def incomplete(self) -> list[str]:
        return list(self._pending)


def run_ingest(source: str, collection: str, config: IngestConfig, sensitivity: Sensitivity | None = None,
               address: str | None = None, progress: bool = True) -> IngestReport:
    """Ingest a folder, file or s3:// prefix into ``collection``; returns the per-file report."""
    import ray

    from ray_app.documents.store_actor import get_store
    from ray_app.documents.embedder import SentenceEmbedder
    from ray_app.models.resolve import resolve_source

    started = time.perf_counter()
    paths = config.paths
    embedder_path = resolve_source(config.embedder, paths)
    list_files(source, config, sensitivity)  # a missing source fails here, before the cluster is joined
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
    settings = DocumentSettings(config.embedder, max_tokens, overlap, config.ocr, config.limits, config.max_file_bytes)

    store = get_store(config.store, paths)
    info = ray.get(store.ensure_collection.remote(collection, dimensions, config.embedder))
    # labels as an upload's: the sensitivity rules, else the one asked for, else the collection's default
    tasks = list_files(source, config, sensitivity or info.default_sensitivity)
    known = {doc_id: (p["doc_hash"], p.get("sensitivity")) for doc_id, p in
             ray.get(store.documents.remote(collection)).items()}

    report = IngestReport(collection=collection)
    if not tasks:
        report.seconds = time.perf_counter() - started
        return report
    dataset = build_dataset(tasks, config, settings, embedder_path, "cuda" if config.embed.num_gpus > 0 else "cpu",
                            known)
    assembler = DocumentAssembler()
    in_flight: list = []
    for row in _iter_rows(dataset):
        if report.first_result_s is None:
            report.first_result_s = time.perf_counter() - started
        meta = DocMeta(**row["doc"])
        if row["status"] == CHUNK:
            complete = assembler.add(row)
            if complete is None:
                continue
            chunks, dense, sparse = complete
            records = build_records(meta, chunks, dense, sparse)
            in_flight.append(store.replace_document.remote(collection, meta.doc_id, records))
            report.files.append(meta.outcome(INDEXED, len(chunks)))
            if len(in_flight) > 8:  # back-pressure: the writer keeps up or the stream waits
                ray.get(in_flight.pop(0))
        else:
            if row["status"] in (UNCHANGED, RELABELLED):  # a replace that crashed midway left other versions
                in_flight.append(store.prune.remote(collection, meta.doc_id, meta.doc_hash))
            if row["status"] == RELABELLED:
                in_flight.append(store.set_sensitivity.remote(collection, meta.doc_id, meta.sensitivity))
            report.files.append(meta.outcome(row["status"], code=row["code"] or None, reason=row["reason"] or None))
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
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from _rows(batch)
