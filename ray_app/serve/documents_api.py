"""The serving logic of the document routes (retrieve, OCR, uploads, collections): a plain class.

Backends are the ``Knowledge`` and ``OCR`` deployments in production (through handles) and local
objects in tests. Failures come back as typed ``APIError``s in OpenAI's format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Protocol

from ray_app.documents.config import Sensitivity
from ray_app.documents.report import FileOutcome
from ray_app.documents.retrieval import Passage, RetrievalOptions, RetrieveRequest
from ray_app.serve.errors import APIError, InvalidRequestError, NotFoundError, from_document_error


class KnowledgeBackend(Protocol):
    async def retrieve(self, query: str, options: RetrievalOptions) -> list[Passage]: ...
    async def augment(self, messages: list[dict], options: RetrievalOptions) -> tuple[list[dict], list[dict], list]: ...
    async def ingest_file(self, collection: str, filename: str, data: bytes,
                          sensitivity: Sensitivity | None) -> FileOutcome: ...
    async def collections(self) -> list[dict[str, Any]]: ...
    async def delete_document(self, collection: str, doc_id: str) -> int: ...


class OCRBackend(Protocol):
    async def recognize(self, filename: str, data: bytes) -> list[dict]: ...


class NotConfiguredError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_configured"


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

    async def retrieve(self, request: RetrieveRequest) -> dict[str, Any]:
        passages = await self._call("Knowledge", self._knowledge().retrieve(request.query, request))
        return {"object": "list", "collection": request.collection, "data": [p.to_dict() for p in passages]}

    async def augment(self, messages: list[dict], rag: Any) -> tuple[list[dict], list[dict], list]:
        try:
            options = RetrievalOptions.model_validate(rag)
        except ValueError as exc:
            raise InvalidRequestError(f"rag: {exc}", param="rag") from None
        return await self._call("Knowledge", self._knowledge().augment(messages, options))

    async def ocr(self, filename: str, data: bytes) -> dict[str, Any]:
        if self.ocr_backend is None:
            raise NotConfiguredError("OCR is not configured on this server (`ocr:` in the Serve config)")
        pages = await self._call("OCR", self.ocr_backend.recognize(filename, data))
        return {"object": "ocr", "filename": filename, "text": "\n\n".join(p["text"] for p in pages), "pages": pages}

    async def upload(self, collection: str, filename: str, data: bytes, sensitivity: Sensitivity | None) -> dict:
        outcome = await self._call("Knowledge", self._knowledge().ingest_file(collection, filename, data, sensitivity))
        return {"object": "document", "collection": collection, **asdict(outcome)}

    async def collections(self) -> dict[str, Any]:
        return {"object": "list", "data": await self._call("Knowledge", self._knowledge().collections())}

    async def delete_document(self, collection: str, doc_id: str) -> dict[str, Any]:
        deleted = await self._call("Knowledge", self._knowledge().delete_document(collection, doc_id))
        if deleted == 0:
            raise NotFoundError(f"no document {doc_id!r} in collection {collection!r}", param="doc_id",
                                code="document_not_found")
        return {"object": "document.deleted", "collection": collection, "doc_id": doc_id, "chunks": deleted}
