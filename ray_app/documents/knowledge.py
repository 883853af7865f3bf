"""``KnowledgeBase``: what the serving side does with collections, as a plain class.

Retrieval (``/v1/retrieve``), retrieval-augmented chat (numbered sources in the prompt, citations in
the response), single-file uploads (the pipeline's own steps, ``DocumentSteps``, chained for one file),
and collection administration. Its heavy parts are injected: the store (the cluster's store actor, or a
local store in tests), the embedder and OCR (Serve handles, or local objects in tests).

An upload's chunks are embedded in small batches, so the queries of other requests get the embedder
between them; the same bytes uploaded with another label relabel the document in place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from ray_app.documents.config import DocumentLimits, OCRConfig, Sensitivity
from ray_app.documents.parse import Element, ParsedDocument, RefusedFile
from ray_app.documents.processing import DocMeta, DocumentSettings, DocumentSteps, build_records
from ray_app.documents.report import FileOutcome
from ray_app.documents.retrieval import Passage, RetrievalOptions, Retriever, rag_messages
from ray_app.documents.sources import document_id
from ray_app.documents.store import SearchHit, VectorStore
from ray_app.documents.embedder import Embeddings


class AsyncStore(Protocol):
    async def collection_names(self) -> list[str]: ...
    async def collection(self, name: str) -> Any: ...
    async def document(self, name: str, doc_id: str) -> dict | None: ...
    async def documents(self, name: str) -> dict[str, dict]: ...
    async def replace_document(self, name: str, doc_id: str, records: list) -> None: ...
    async def set_sensitivity(self, name: str, doc_id: str, sensitivity: str) -> int: ...
    async def prune(self, name: str, doc_id: str, doc_hash: str) -> None: ...
    async def create_collection(self, name: str, dimensions: int, embedder: str,
                                default_sensitivity: str | None) -> Any: ...
    async def drop_collection(self, name: str) -> None: ...
    async def delete_document(self, name: str, doc_id: str) -> int: ...
    async def search(self, name: str, **kwargs) -> list[SearchHit]: ...


class ActorStore:
    """The cluster's ``VectorStoreActor`` behind async methods. The actor restarts itself when its
    process dies; if it is gone for good (killed for good, its node lost) it is looked up (or created)
    again once."""

    def __init__(self, connect: Callable[[], Any]):
        self._connect = connect
        self._actor = connect()

    def __getattr__(self, method: str):
        async def call(*args, **kwargs):
            from ray.exceptions import ActorDiedError

            try:
                return await getattr(self._actor, method).remote(*args, **kwargs)
            except ActorDiedError:
                self._actor = self._connect()
                return await getattr(self._actor, method).remote(*args, **kwargs)

        return call


class LocalStore:
    """A ``VectorStore`` in this process behind async methods (tests, single-process tools)."""

    def __init__(self, store: VectorStore):
        self._store = store

    def __getattr__(self, method: str):
        function = getattr(self._store, method)

        async def call(*args, **kwargs):
            return await asyncio.to_thread(function, *args, **kwargs)

        return call


EmbedTexts = Callable[[list[str]], Awaitable[Embeddings]]
OCRElements = Callable[[ParsedDocument, bytes], Awaitable[list[Element]]]


@dataclass
class UploadSettings:
    embedder_source: str
    max_tokens: int
    overlap: int
    ocr: OCRConfig
    max_bytes: int
    default_sensitivity: Sensitivity
    limits: DocumentLimits = field(default_factory=DocumentLimits)
    embed_batch: int = 16
    dimensions: int | None = None  # of the embedder: what new collections hold


class KnowledgeBase:
    def __init__(self, store: AsyncStore, embed: EmbedTexts, tokenizer, upload: UploadSettings,
                 ocr: OCRElements | None = None, reranker=None, max_context_chars: int = 4000, top_k: int = 5):
        self.store = store
        self.embed = embed
        self.ocr = ocr
        self.upload = upload
        self.max_context_chars = max_context_chars
        self.top_k = top_k
        self.steps = DocumentSteps(DocumentSettings(upload.embedder_source, upload.max_tokens, upload.overlap,
                                                    upload.ocr, upload.limits, upload.max_bytes), tokenizer)
        self.chunker = self.steps.chunker  # benchmarks/ingest_bench.py records the chunks through it
        self.retriever = Retriever(self.store.search, self._embed_query, self.steps.sparse, reranker)

    async def _embed_query(self, query: str) -> list[float]:
        return (await self.embed([query])).vectors[0].tolist()

    async def retrieve(self, query: str, options: RetrievalOptions) -> list[Passage]:
        await self._check_collection(options.collection)
        return await self.retriever.retrieve(query, options)

    async def augment(self, messages: list[dict], options: RetrievalOptions) -> tuple[list[dict], list[dict], list[Passage]]:
        """(messages with the sources, citations, cited passages) for a chat that asks for retrieval."""
        query = last_user_text(messages)
        if not query:
            raise ValueError("retrieval needs a user message to search for")
        passages = await self.retrieve(query, options)
        augmented, cited = rag_messages(messages, passages, self.max_context_chars)
        return augmented, [p.citation() for p in cited], cited

    async def _check_collection(self, name: str) -> None:
        await self.store.collection(name)  # raises CollectionNotFound (listing the known ones)

    async def collections(self) -> list[dict[str, Any]]:
        infos = [await self.store.collection(name) for name in await self.store.collection_names()]
        return [_collection_dict(i) for i in infos]

    async def create_collection(self, name: str, default_sensitivity: Sensitivity | None = None,
                                embedder: str | None = None) -> dict[str, Any]:
        if embedder not in (None, self.upload.embedder_source):
            raise ValueError(f"embedder {embedder!r}: this knowledge base embeds with {self.upload.embedder_source!r}")
        if self.upload.dimensions is None:
            self.upload.dimensions = int((await self.embed(["dimensions"])).vectors.shape[1])
        info = await self.store.create_collection(name, self.upload.dimensions, self.upload.embedder_source,
                                                  default_sensitivity)
        return _collection_dict(info)

    async def drop_collection(self, name: str) -> None:
        await self._check_collection(name)
        await self.store.drop_collection(name)

    async def delete_document(self, collection: str, doc_id: str) -> int:
        await self._check_collection(collection)
        return await self.store.delete_document(collection, doc_id)

    async def documents(self, collection: str, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        """One page of the collection's documents (completely written ones), by source then id; ``after``
        is the last ``doc_id`` of the page before."""
        await self._check_collection(collection)
        listed = sorted(((p.get("source") or "", doc_id, p) for doc_id, p in
                         (await self.store.documents(collection)).items()), key=lambda t: t[:2])
        if after is not None:
            position = next((i for i, (_, doc_id, _) in enumerate(listed) if doc_id == after), None)
            if position is None:
                raise ValueError(f"after: no document {after!r} in collection {collection!r}")
            listed = listed[position + 1:]
        page = [{"object": "document", "doc_id": doc_id, "source": source, "title": p.get("title"),
                 "path": p.get("path"), "sensitivity": p.get("sensitivity"), "chunks": p.get("chunk_count"),
                 "ingested_at": p.get("ingested_at")} for source, doc_id, p in listed[:limit]]
        return {"object": "list", "data": page, "has_more": len(listed) > limit,
                "last_id": page[-1]["doc_id"] if page else None}

    async def ingest_file(self, collection: str, filename: str, data: bytes,
                          sensitivity: Sensitivity | None = None) -> FileOutcome:
        """One uploaded file through the pipeline's steps, then written. Raises ``RefusedFile``."""
        info = await self.store.collection(collection)  # raises CollectionNotFound, saying how to create it
        source = f"upload://{collection}/{filename}"
        meta = DocMeta(document_id(source), source, filename,
                       sensitivity or info.default_sensitivity or self.upload.default_sensitivity)
        steps = self.steps
        steps.check_size(len(data))
        existing = await self.store.document(collection, meta.doc_id)
        known = (existing.get("doc_hash"), existing.get("sensitivity")) if existing else None
        if reused := steps.version(meta, data, known):
            await self.store.prune(collection, meta.doc_id, meta.doc_hash)  # a replace that crashed midway
            if reused == "relabelled":  # every chunk takes the new label, or RAG would route by the old one
                await self.store.set_sensitivity(collection, meta.doc_id, meta.sensitivity)
            return meta.outcome(reused, chunks=existing.get("chunk_count", 0))
        parsed = await asyncio.to_thread(steps.parse, meta, data)
        if parsed.ocr_pages:
            if self.ocr is None:
                raise RefusedFile("ocr_error", "this file needs OCR and OCR is not configured (`ocr:` in the Serve config)")
            parsed.elements = await self.ocr(parsed, data)
        chunks = await asyncio.to_thread(steps.chunk, parsed)
        step = self.upload.embed_batch
        vectors = [(await self.embed([c.text for c in chunks[i:i + step]])).vectors for i in range(0, len(chunks), step)]
        sparse = await asyncio.to_thread(steps.sparse_vectors, chunks)
        await self.store.replace_document(collection, meta.doc_id,
                                          build_records(meta, chunks, np.concatenate(vectors), sparse))
        return meta.outcome("indexed", len(chunks))


def _collection_dict(info) -> dict[str, Any]:
    return {"name": info.name, "documents": info.documents, "points": info.points, "dimensions": info.dimensions,
            "embedder": info.embedder, "default_sensitivity": info.default_sensitivity}


def last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(part.get("text", "") for part in content or [] if isinstance(part, dict))
    return ""
