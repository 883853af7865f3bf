"""The vector store: one collection per knowledge base, a dense vector (the embedder) and a sparse
BM25 vector (IDF modifier) per chunk, hybrid queries fused with RRF by Qdrant's Query API.

Two implementations behind one interface:
- ``EdgeVectorStore``: Qdrant's own engine embedded in-process (``qdrant-edge-py``), one persistent
  shard per collection under ``<data_dir>/collections``. The default: fast and complete.
- ``QdrantClientVectorStore``: a Qdrant server through ``qdrant-client`` (multi-node clusters); with
  a ``path`` instead of a URL it runs qdrant-client's local mode, which stands in for the server API
  in tests.

An embedded shard allows one process: ``EdgeVectorStore`` holds an exclusive lock on each shard it
opens, and ray_app routes every read and write through one ``VectorStoreActor`` per cluster.

Documents are replaced whole, without a moment where neither version is searchable: every chunk
carries ``doc_id`` and the document's ``doc_hash``; the new version's chunks are written first (chunk 0,
which carries ``chunk_count``, last: a document whose chunk 0 has the new hash was written completely),
then the old version's chunks are deleted. A writer that crashes between the two leaves both versions;
the next ingest of the document finds it unchanged and prunes the chunks of other versions.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray_app.documents.config import StoreConfig
from ray_app.paths import DataDir

DENSE = "dense"
SPARSE = "bm25"
RRF_K = 60
SearchMode = Literal["hybrid", "dense", "sparse"]
INDEXED_FIELDS = ("doc_id", "source", "sensitivity")
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
POINT_NAMESPACE = uuid.UUID("8f4d1f5e-52d5-4a0e-9d35-3b8f7b2d1c11")


class StoreError(RuntimeError):
    pass


class CollectionNotFound(StoreError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"collection {name!r} does not exist (collections: {', '.join(known) or 'none'}); create it "
                         f"with POST /v1/collections {{\"name\": \"{name}\"}} or `ray-app collection create {name}`")
        self.name, self.known = name, known

    def __reduce__(self):
        return type(self), (self.name, self.known)


class CollectionExists(StoreError):
    def __init__(self, name: str):
        super().__init__(f"collection {name!r} already exists")
        self.name = name

    def __reduce__(self):
        return type(self), (self.name,)


def check_collection_name(name: str) -> str:
    if not name or not set(name) <= _NAME_OK or name.startswith("."):
        raise StoreError(f"collection name {name!r}: use letters, digits, '-', '_' and '.'")
    return name


def point_id(doc_id: str, chunk_index: int, content_hash: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{doc_id}:{chunk_index}:{content_hash}"))


@dataclass
class PointRecord:
    id: str
    dense: list[float]
    sparse_indices: list[int]
    sparse_values: list[float]
    payload: dict[str, Any]


@dataclass
class SearchHit:
    id: str
    score: float
    payload: dict[str, Any]


@dataclass
class SearchFilter:
    sources: list[str] | None = None
    sensitivities: list[str] | None = None
    doc_ids: list[str] | None = None

    def conditions(self) -> list[tuple[str, list[str]]]:
        pairs = (("source", self.sources), ("sensitivity", self.sensitivities), ("doc_id", self.doc_ids))
        return [(key, values) for key, values in pairs if values]


@dataclass
class CollectionInfo:
    name: str
    dimensions: int
    embedder: str
    points: int = 0
    documents: int = 0
    default_sensitivity: str | None = None  # the label of uploads that name none (None: the server's default)
    extra: dict[str, Any] = field(default_factory=dict)


class VectorStore(ABC):
    @abstractmethod
    def create_collection(self, name: str, dimensions: int, embedder: str,
                          default_sensitivity: str | None = None) -> CollectionInfo: ...

    @abstractmethod
    def collection(self, name: str) -> CollectionInfo: ...

    @abstractmethod
    def collection_names(self) -> list[str]: ...

    @abstractmethod
    def drop_collection(self, name: str) -> None: ...

    @abstractmethod
    def documents(self, name: str, doc_id: str | None = None) -> dict[str, dict[str, Any]]:
        """doc_id -> payload of its chunk 0 (doc_hash, chunk_count, source, title, ...), without text."""

    @abstractmethod
    def chunks(self, name: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` chunks' payloads (text included) of complete documents, by document and index."""

    def document(self, name: str, doc_id: str) -> dict[str, Any] | None:
        """Chunk 0's payload of ``doc_id`` (present only for completely written documents)."""
        return self.documents(name, doc_id=doc_id).get(doc_id)

    def _complete(self, name: str, payloads: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
        done = self.documents(name)
        kept = [p for p in payloads if p.get("doc_id") in done and p.get("doc_hash") == done[p["doc_id"]]["doc_hash"]]
        return sorted(kept, key=lambda p: (p["doc_id"], p.get("chunk_index", 0)))[:limit]

    def replace_document(self, name: str, doc_id: str, records: list[PointRecord]) -> None:
        """The new version's chunks (chunk 0 last), then every other chunk of the document gone."""
        rest = [r for r in records if r.payload["chunk_index"] != 0]
        first = [r for r in records if r.payload["chunk_index"] == 0]
        for part in (rest, first):
            if part:
                self._upsert(name, part)
        self._delete_stale(name, doc_id, keep_ids={r.id for r in records})

    def prune(self, name: str, doc_id: str, doc_hash: str) -> None:
        """Drop chunks of other versions of a document (left by a writer that crashed mid-replace)."""
        self._delete_stale(name, doc_id, keep_hash=doc_hash)

    @abstractmethod
    def _upsert(self, name: str, records: list[PointRecord]) -> None: ...

    @abstractmethod
    def _delete_stale(self, name: str, doc_id: str, keep_ids: set[str] | None = None,
                      keep_hash: str | None = None) -> None:
        """Delete the chunks of ``doc_id`` except those with an id in ``keep_ids`` or of version ``keep_hash``."""

    @abstractmethod
    def set_sensitivity(self, name: str, doc_id: str, sensitivity: str) -> int:
        """Relabel every chunk of a document (a re-upload with a new label, a new sensitivity rule)."""

    @abstractmethod
    def delete_document(self, name: str, doc_id: str) -> int:
        """Delete every chunk of ``doc_id``; returns how many were deleted."""

    @abstractmethod
    def search(self, name: str, *, dense: list[float] | None, sparse: tuple[list[int], list[float]] | None,
               mode: SearchMode, limit: int, prefetch_limit: int, filter: SearchFilter | None = None,
               exact: bool = False) -> list[SearchHit]: ...

    def ensure_collection(self, name: str, dimensions: int, embedder: str,
                          default_sensitivity: str | None = None) -> CollectionInfo:
        if name in self.collection_names():
            info = self.collection(name)
            if info.dimensions != dimensions or info.embedder != embedder:
                raise StoreError(f"collection {name!r} holds {info.dimensions}-d vectors of {info.embedder!r}; "
                                 f"cannot add {dimensions}-d vectors of {embedder!r}")
            return info
        return self.create_collection(name, dimensions, embedder, default_sensitivity)

    def optimize(self, name: str) -> None:  # noqa: B027 - a no-op where the engine optimises by itself
        pass

    def flush(self, name: str) -> None:  # noqa: B027 - a no-op where writes are durable when acknowledged
        pass

    def close(self) -> None:  # noqa: B027
        pass


def _keep_complete(out: dict[str, dict | None], payload: dict) -> None:
    """Collect chunk-0 payloads; two versions' chunk 0s mean a replace was cut short (None: incomplete)."""
    payload.pop("text", None)
    doc = payload["doc_id"]
    if doc in out and (out[doc] is None or out[doc]["doc_hash"] != payload["doc_hash"]):
        out[doc] = None
    else:
        out[doc] = payload


# -- Qdrant Edge ---------------------------------------------------------------------------------


class EdgeVectorStore(VectorStore):
    def __init__(self, root: str | Path):
        import qdrant_edge

        self._qe = qdrant_edge
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._shards: dict[str, Any] = {}
        self._locks: dict[str, Any] = {}

    def _dir(self, name: str) -> Path:
        return self.root / check_collection_name(name)

    def _meta(self, name: str) -> dict[str, Any]:
        return json.loads((self._dir(name) / "collection.json").read_text())

    def _lock(self, name: str) -> None:
        lock = open(self._dir(name) / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StoreError(
                f"collection {name!r} ({self._dir(name)}) is open in another process: an embedded Qdrant shard "
                "has one writer. Run the command against the cluster that holds it (e.g. `--address auto` "
                "when `serve run` is up).") from None
        self._locks[name] = lock

    def _shard(self, name: str):
        if name not in self._shards:
            if not (self._dir(name) / "collection.json").is_file():
                raise CollectionNotFound(name, self.collection_names())
            self._lock(name)
            self._shards[name] = self._qe.EdgeShard.load(str(self._dir(name) / "shard"))
        return self._shards[name]

    def collection_names(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/collection.json"))

    def create_collection(self, name: str, dimensions: int, embedder: str,
                          default_sensitivity: str | None = None) -> CollectionInfo:
        qe = self._qe
        folder = self._dir(name)
        if (folder / "collection.json").is_file():
            raise CollectionExists(name)
        folder.mkdir(parents=True, exist_ok=True)
        self._lock(name)
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dimensions, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        )
        shard = qe.EdgeShard.create(str(folder / "shard"), config)
        for key in INDEXED_FIELDS:
            shard.update(qe.UpdateOperation.create_field_index(key, qe.PayloadSchemaType.Keyword))
        shard.update(qe.UpdateOperation.create_field_index("chunk_index", qe.PayloadSchemaType.Integer))
        self._shards[name] = shard
        (folder / "collection.json").write_text(json.dumps(
            {"dimensions": dimensions, "embedder": embedder, "default_sensitivity": default_sensitivity}))
        return self.collection(name)

    def collection(self, name: str) -> CollectionInfo:
        shard = self._shard(name)
        meta = self._meta(name)
        return CollectionInfo(name, meta["dimensions"], meta["embedder"], points=shard.info().points_count,
                              documents=shard.count(self._qe.CountRequest(filter=self._chunk0())),
                              default_sensitivity=meta.get("default_sensitivity"))

    def drop_collection(self, name: str) -> None:
        if name not in self.collection_names():
            raise CollectionNotFound(name, self.collection_names())
        shard = self._shards.pop(name, None)
        if shard is not None:
            shard.close()
        lock = self._locks.pop(name, None)
        if lock is not None:
            lock.close()
        shutil.rmtree(self._dir(name))

    def _chunk0(self, doc_id: str | None = None):
        qe = self._qe
        must = [qe.FieldCondition(key="chunk_index", match=qe.MatchValue(0))]
        if doc_id is not None:
            must.append(qe.FieldCondition(key="doc_id", match=qe.MatchValue(doc_id)))
        return qe.Filter(must=must)

    def _filter(self, search_filter: SearchFilter | None, doc_id: str | None = None):
        qe = self._qe
        conditions = [] if search_filter is None else [
            qe.FieldCondition(key=key, match=qe.MatchAny(values)) for key, values in search_filter.conditions()]
        if doc_id is not None:
            conditions.append(qe.FieldCondition(key="doc_id", match=qe.MatchValue(doc_id)))
        return qe.Filter(must=conditions) if conditions else None

    def documents(self, name: str, doc_id: str | None = None) -> dict[str, dict[str, Any]]:
        shard, out, offset = self._shard(name), {}, None
        while True:
            records, offset = shard.scroll(self._qe.ScrollRequest(
                offset=offset, limit=1000, filter=self._chunk0(doc_id), with_payload=True, with_vector=False))
            for record in records:
                _keep_complete(out, dict(record.payload))
            if offset is None:
                return {doc: p for doc, p in out.items() if p is not None}

    def chunks(self, name: str, limit: int) -> list[dict[str, Any]]:
        shard, out, offset = self._shard(name), [], None
        while len(out) < limit * 2:
            records, offset = shard.scroll(self._qe.ScrollRequest(offset=offset, limit=1000, with_payload=True,
                                                                  with_vector=False))
            out += [dict(r.payload) for r in records]
            if offset is None:
                break
        return self._complete(name, out, limit)

    def _upsert(self, name: str, records: list[PointRecord]) -> None:
        qe = self._qe
        self._shard(name).update(qe.UpdateOperation.upsert_points([qe.Point(id=r.id, payload=r.payload, vector={
            DENSE: [float(x) for x in r.dense], SPARSE: qe.SparseVector(r.sparse_indices, r.sparse_values)})
            for r in records]))

    def _delete_stale(self, name: str, doc_id: str, keep_ids: set[str] | None = None,
                      keep_hash: str | None = None) -> None:
        qe = self._qe
        must = [qe.FieldCondition(key="doc_id", match=qe.MatchValue(doc_id))]
        must_not = ([qe.HasIdCondition(set(keep_ids))] if keep_ids else []) + (
            [qe.FieldCondition(key="doc_hash", match=qe.MatchValue(keep_hash))] if keep_hash else [])
        self._shard(name).update(qe.UpdateOperation.delete_points_by_filter(
            qe.Filter(must=must, must_not=must_not or None)))

    def set_sensitivity(self, name: str, doc_id: str, sensitivity: str) -> int:
        qe, shard = self._qe, self._shard(name)
        selector = self._filter(None, doc_id)
        count = shard.count(qe.CountRequest(filter=selector))
        if count:
            shard.update(qe.UpdateOperation.set_payload_by_filter(selector, {"sensitivity": sensitivity}))
        return count

    def delete_document(self, name: str, doc_id: str) -> int:
        qe, shard = self._qe, self._shard(name)
        selector = self._filter(None, doc_id)
        count = shard.count(qe.CountRequest(filter=selector))
        if count:
            shard.update(qe.UpdateOperation.delete_points_by_filter(selector))
        return count

    def search(self, name, *, dense, sparse, mode, limit, prefetch_limit, filter=None, exact=False):
        qe, shard = self._qe, self._shard(name)
        selector = self._filter(filter)
        params = qe.SearchParams(exact=exact)
        dense_q = qe.Query.Nearest([float(x) for x in dense], using=DENSE) if dense is not None else None
        sparse_q = qe.Query.Nearest(qe.SparseVector(*sparse), using=SPARSE) if sparse is not None else None
        if mode == "hybrid":
            request = qe.QueryRequest(
                limit=limit, with_payload=True, query=qe.Fusion.Rrf(k=RRF_K),
                prefetches=[qe.Prefetch(limit=prefetch_limit, query=dense_q, filter=selector, params=params),
                            qe.Prefetch(limit=prefetch_limit, query=sparse_q, filter=selector)])
        else:
            request = qe.QueryRequest(limit=limit, with_payload=True, filter=selector,
                                      query=dense_q if mode == "dense" else sparse_q,
                                      params=params if mode == "dense" else None)
        return [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in shard.query(request)]

    def optimize(self, name: str) -> None:
        self._shard(name).optimize()

    def flush(self, name: str) -> None:
        self._shard(name).flush()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.flush()
            shard.close()
        self._shards.clear()
        for lock in self._locks.values():
            lock.close()
        self._locks.clear()


# -- Qdrant server (qdrant-client) ---------------------------------------------------------------


class QdrantClientVectorStore(VectorStore):
    def __init__(self, url: str | None = None, path: str | None = None, api_key: str | None = None):
        from qdrant_client import QdrantClient, models

        self.models = models
        self.client = QdrantClient(url=url, api_key=api_key) if url else QdrantClient(path=path)
        self._server = url is not None  # local mode scans everything and ignores payload indexes

    def collection_names(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def create_collection(self, name: str, dimensions: int, embedder: str,
                          default_sensitivity: str | None = None) -> CollectionInfo:
        m = self.models
        if name in self.collection_names():
            raise CollectionExists(name)
        self.client.create_collection(
            check_collection_name(name),
            vectors_config={DENSE: m.VectorParams(size=dimensions, distance=m.Distance.COSINE)},
            sparse_vectors_config={SPARSE: m.SparseVectorParams(modifier=m.Modifier.IDF)},
            metadata={"embedder": embedder, "default_sensitivity": default_sensitivity},
        )
        if self._server:
            for key in INDEXED_FIELDS:
                self.client.create_payload_index(name, key, m.PayloadSchemaType.KEYWORD)
            self.client.create_payload_index(name, "chunk_index", m.PayloadSchemaType.INTEGER)
        return self.collection(name)

    def collection(self, name: str) -> CollectionInfo:
        if name not in self.collection_names():
            raise CollectionNotFound(name, self.collection_names())
        info = self.client.get_collection(name)
        dense = info.config.params.vectors[DENSE]
        metadata = info.config.metadata or {}
        documents = self.client.count(name, count_filter=self._chunk0(), exact=True).count
        return CollectionInfo(name, dense.size, metadata.get("embedder", ""), points=info.points_count or 0,
                              documents=documents, default_sensitivity=metadata.get("default_sensitivity"))

    def drop_collection(self, name: str) -> None:
        if name not in self.collection_names():
            raise CollectionNotFound(name, self.collection_names())
        self.client.delete_collection(name)

    def _chunk0(self, doc_id: str | None = None):
        m = self.models
        must = [m.FieldCondition(key="chunk_index", match=m.MatchValue(value=0))]
        if doc_id is not None:
            must.append(m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id)))
        return m.Filter(must=must)

    def _filter(self, search_filter: SearchFilter | None, doc_id: str | None = None):
        m = self.models
        conditions = [] if search_filter is None else [
            m.FieldCondition(key=key, match=m.MatchAny(any=values)) for key, values in search_filter.conditions()]
        if doc_id is not None:
            conditions.append(m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id)))
        return m.Filter(must=conditions) if conditions else None

    def documents(self, name: str, doc_id: str | None = None) -> dict[str, dict[str, Any]]:
        out, offset = {}, None
        while True:
            records, offset = self.client.scroll(name, scroll_filter=self._chunk0(doc_id), limit=1000, offset=offset,
                                                 with_payload=True, with_vectors=False)
            for record in records:
                _keep_complete(out, dict(record.payload or {}))
            if offset is None:
                return {doc: p for doc, p in out.items() if p is not None}

    def chunks(self, name: str, limit: int) -> list[dict[str, Any]]:
        out, offset = [], None
        while len(out) < limit * 2:
            records, offset = self.client.scroll(name, limit=1000, offset=offset, with_payload=True,
                                                 with_vectors=False)
            out += [dict(r.payload or {}) for r in records]
            if offset is None:
                break
        return self._complete(name, out, limit)

    def _upsert(self, name: str, records: list[PointRecord]) -> None:
        m = self.models
        self.client.upsert(name, wait=True, points=[m.PointStruct(id=r.id, payload=r.payload, vector={
            DENSE: [float(x) for x in r.dense], SPARSE: m.SparseVector(indices=r.sparse_indices, values=r.sparse_values)})
            for r in records])

    def _delete_stale(self, name: str, doc_id: str, keep_ids: set[str] | None = None,
                      keep_hash: str | None = None) -> None:
        m = self.models
        must = [m.FieldCondition(key="doc_id", match=m.MatchValue(value=doc_id))]
        must_not = ([m.HasIdCondition(has_id=sorted(keep_ids))] if keep_ids else []) + (
            [m.FieldCondition(key="doc_hash", match=m.MatchValue(value=keep_hash))] if keep_hash else [])
        self.client.delete(name, points_selector=m.FilterSelector(filter=m.Filter(must=must, must_not=must_not)),
                           wait=True)

    def set_sensitivity(self, name: str, doc_id: str, sensitivity: str) -> int:
        m = self.models
        selector = self._filter(None, doc_id)
        count = self.client.count(name, count_filter=selector, exact=True).count
        if count:
            self.client.set_payload(name, payload={"sensitivity": sensitivity},
                                    points=m.FilterSelector(filter=selector), wait=True)
        return count

    def delete_document(self, name: str, doc_id: str) -> int:
        m = self.models
        selector = self._filter(None, doc_id)
        count = self.client.count(name, count_filter=selector, exact=True).count
        if count:
            self.client.delete(name, points_selector=m.FilterSelector(filter=selector), wait=True)
        return count

    def search(self, name, *, dense, sparse, mode, limit, prefetch_limit, filter=None, exact=False):
        m = self.models
        selector = self._filter(filter)
        params = m.SearchParams(exact=exact)
        sparse_q = m.SparseVector(indices=sparse[0], values=sparse[1]) if sparse is not None else None
        dense_q = [float(x) for x in dense] if dense is not None else None
        if mode == "hybrid":
            response = self.client.query_points(
                name, limit=limit, with_payload=True, query=m.FusionQuery(fusion=m.Fusion.RRF),
                prefetch=[m.Prefetch(query=dense_q, using=DENSE, limit=prefetch_limit, filter=selector, params=params),
                          m.Prefetch(query=sparse_q, using=SPARSE, limit=prefetch_limit, filter=selector)])
        elif mode == "dense":
            response = self.client.query_points(name, query=dense_q, using=DENSE, limit=limit, query_filter=selector,
                                                with_payload=True, search_params=params)
        else:
            response = self.client.query_points(name, query=sparse_q, using=SPARSE, limit=limit,
                                                query_filter=selector, with_payload=True)
        return [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]

    def close(self) -> None:
        self.client.close()


def open_store(config: StoreConfig, paths: DataDir) -> VectorStore:
    if config.backend == "edge":
        return EdgeVectorStore(paths.root / "collections")
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    return QdrantClientVectorStore(url=config.url, path=config.path, api_key=api_key)
