"""The serving logic of the document routes (retrieve, OCR, uploads, collections): a plain class.

Every route passes the ``Caller`` in, and its scopes are enforced here, the one door to the knowledge
base: reading a collection (retrieval, RAG) needs ``read`` on it and never returns a chunk labelled
above the caller's clearance; uploading needs ``write``; deleting documents and creating or dropping
collections need ``admin``. Backends are the ``Knowledge`` and ``OCR`` deployments in production
(through handles) and local objects in tests. Failures come back as typed ``APIError``s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Protocol

from ray_app.documents.report import FileOutcome
from ray_app.documents.retrieval import Passage, RetrievalFilter, RetrievalOptions, RetrieveRequest
from ray_app.sensitivity import Sensitivity
from ray_app.serve.auth import OPEN_ANONYMOUS, Caller
from ray_app.serve.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    from_document_error,
)


class KnowledgeBackend(Protocol):
    async def retrieve(self, query: str, options: RetrievalOptions) -> list[Passage]: ...
    async def augment(self, messages: list[dict], options: RetrievalOptions) -> tuple[list[dict], list[dict], list]: ...
    async def ingest_file(self, collection: str, filename: str, data: bytes,
                          sensitivity: Sensitivity | None) -> FileOutcome: ...
    async def collections(self) -> list[dict[str, Any]]: ...
    async def create_collection(self, name: str, default_sensitivity: Sensitivity | None,
                                embedder: str | None) -> dict[str, Any]: ...
    async def drop_collection(self, name: str) -> None: ...
    async def delete_document(self, collection: str, doc_id: str) -> int: ...
    async def documents(self, collection: str, limit: int, after: str | None) -> dict[str, Any]: ...


class OCRBackend(Protocol):
    async def recognize(self, filename: str, data: bytes) -> list[dict]: ...


class NotConfiguredError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_configured"


def scoped(options: RetrievalOptions, caller: Caller) -> RetrievalOptions:
    """``options`` limited to what the caller may read: its collection, and chunks up to its clearance."""
    caller.require_read(options.collection)
    allowed = caller.scopes.labels
    asked = options.filter.sensitivity if options.filter and options.filter.sensitivity else None
    if asked is not None and not set(asked) <= set(allowed):
        raise PermissionDeniedError(f"this key's clearance is {caller.scopes.clearance!r}: it may not retrieve "
                                    f"{sorted(set(asked) - set(allowed))} chunks", param="filter.sensitivity")
    labels = asked or allowed
    base = options.filter or RetrievalFilter()
    return options.model_copy(update={"filter": base.model_copy(update={"sensitivity": list(labels)})})


@dataclass
class DocumentsService:
    knowledge: KnowledgeBackend | None = None
    ocr_backend: OCRBackend | None = None

    def _knowledge(self) -> KnowledgeBackend:
        if self.knowledge is None:
            raise NotConfiguredError("retrieval is not configured on this server (`knowledge:` in the Serve config)")
        return self.knowledge

    @staticmethod
    async def _call(what: str, call: Awaitable):
        try:
            return await call
        except APIError:
            raise
        except Exception as exc:
            raise from_document_error(exc, what) from exc

    async def retrieve(self, request: RetrieveRequest, caller: Caller = OPEN_ANONYMOUS) -> dict[str, Any]:
        options = scoped(request, caller)
        passages = await self._call("Knowledge", self._knowledge().retrieve(request.query, options))
        return {"object": "list", "collection": request.collection, "data": [p.to_dict() for p in passages]}

    async def augment(self, messages: list[dict], rag: Any,
                      caller: Caller = OPEN_ANONYMOUS) -> tuple[list[dict], list[dict], list]:
        try:
            options = RetrievalOptions.model_validate(rag)
        except ValueError as exc:
            raise InvalidRequestError(f"rag: {exc}", param="rag") from None
        return await self._call("Knowledge", self._knowledge().augment(messages, scoped(options, caller)))

    async def ocr(self, filename: str, data: bytes) -> dict[str, Any]:
        if self.ocr_backend is None:
            raise NotConfiguredError("OCR is not configured on this server (`ocr:` in the Serve config)")
        pages = await self._call("OCR", self.ocr_backend.recognize(filename, data))
        return {"object": "ocr", "filename": filename, "text": "\n\n".join(p["text"] for p in pages), "pages": pages}

    async def upload(self, collection: str, filename: str, data: bytes, sensitivity: Sensitivity | None,
                     caller: Caller = OPEN_ANONYMOUS) -> dict:
        caller.require_write(collection)
        outcome = await self._call("Knowledge", self._knowledge().ingest_file(collection, filename, data, sensitivity))
        return {"object": "document", "collection": collection, **asdict(outcome)}

    async def collections(self, caller: Caller = OPEN_ANONYMOUS) -> dict[str, Any]:
        listed = await self._call("Knowledge", self._knowledge().collections())
        return {"object": "list", "data": [c for c in listed if caller.scopes.can_read(c["name"])]}

    async def create_collection(self, name: str, default_sensitivity: Sensitivity | None,
                                caller: Caller = OPEN_ANONYMOUS, embedder: str | None = None) -> dict[str, Any]:
        caller.require_admin("creating a collection")
        return await self._call("Knowledge", self._knowledge().create_collection(name, default_sensitivity, embedder))

    async def drop_collection(self, name: str, caller: Caller = OPEN_ANONYMOUS) -> dict[str, Any]:
        caller.require_admin("deleting a collection")
        await self._call("Knowledge", self._knowledge().drop_collection(name))
        return {"object": "collection.deleted", "id": name, "deleted": True}

    async def documents(self, collection: str, caller: Caller = OPEN_ANONYMOUS, limit: int = 100,
                        after: str | None = None) -> dict[str, Any]:
        caller.require_read(collection)
        return await self._call("Knowledge", self._knowledge().documents(collection, limit, after))

    async def delete_document(self, collection: str, doc_id: str, caller: Caller = OPEN_ANONYMOUS) -> dict[str, Any]:
        caller.require_admin("deleting a document")
        deleted = await self._call("Knowledge", self._knowledge().delete_document(collection, doc_id))
        if deleted == 0:
            raise NotFoundError(f"no document {doc_id!r} in collection {collection!r}", param="doc_id",
                                code="document_not_found")
        return {"object": "document.deleted", "collection": collection, "doc_id": doc_id, "chunks": deleted}
