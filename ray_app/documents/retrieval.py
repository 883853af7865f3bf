"""Retrieval and retrieval-augmented prompts.

``Retriever`` embeds the query (dense through the embedder, sparse with the BM25 encoder), asks the
store for a hybrid query (both prefetched, fused with RRF by Qdrant), optionally reranks, and returns
passages with their citations. ``rag_messages`` puts the numbered passages in front of a chat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field

from ray_app.documents.config import Sensitivity
from ray_app.documents.sparse import SparseEncoder
from ray_app.documents.store import SearchFilter, SearchHit, SearchMode


class RetrievalFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: list[str] | None = Field(None, description="Only chunks of these source URIs.")
    sensitivity: list[Sensitivity] | None = Field(None, description="Only chunks with these labels.")
    doc_id: list[str] | None = None

    def to_store(self) -> SearchFilter:
        return SearchFilter(sources=self.source, sensitivities=self.sensitivity, doc_ids=self.doc_id)


class RetrievalOptions(BaseModel):
    """``rag`` on a chat request, and the body of ``POST /v1/retrieve`` (with ``query``)."""

    model_config = ConfigDict(extra="forbid")

    collection: str
    top_k: int = Field(5, ge=1, le=100)
    mode: SearchMode = "hybrid"
    filter: RetrievalFilter | None = None


class RetrieveRequest(RetrievalOptions):
    query: str = Field(min_length=1)


@dataclass
class Passage:
    rank: int
    score: float
    doc_id: str
    source: str
    path: str | None
    title: str | None
    page: int | None
    page_end: int | None
    chunk_index: int
    text: str
    sensitivity: str

    @classmethod
    def from_hit(cls, rank: int, hit: SearchHit) -> "Passage":
        p = hit.payload
        return cls(rank, hit.score, p["doc_id"], p["source"], p.get("path"), p.get("title"), p.get("page"),
                   p.get("page_end"), p["chunk_index"], p["text"], p.get("sensitivity", "internal"))

    def citation(self, snippet_chars: int = 300) -> dict[str, Any]:
        snippet = self.text if len(self.text) <= snippet_chars else self.text[:snippet_chars].rsplit(" ", 1)[0] + "…"
        return {"index": self.rank, "doc_id": self.doc_id, "source": self.source, "title": self.title or self.path,
                "page": self.page, "snippet": snippet, "score": round(self.score, 6), "sensitivity": self.sensitivity}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reranker(Protocol):
    def rerank(self, query: str, passages: list[Passage]) -> list[Passage]: ...


class CrossEncoderReranker:
    """Rescores passages with a sentence-transformers cross-encoder (used only when one is configured:
    none ships offline, so by default retrieval ends at the fused ranking)."""

    def __init__(self, model_path: str):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_path)

    def rerank(self, query: str, passages: list[Passage]) -> list[Passage]:
        scores = self.model.predict([(query, p.text) for p in passages])
        ranked = sorted(zip(passages, scores), key=lambda pair: -float(pair[1]))
        return [Passage(**{**p.to_dict(), "rank": i, "score": float(s)}) for i, (p, s) in enumerate(ranked, start=1)]


SearchFn = Callable[..., Awaitable[list[SearchHit]]]
EmbedFn = Callable[[str], Awaitable[list[float]]]


class Retriever:
    def __init__(self, search: SearchFn, embed_query: EmbedFn, sparse: SparseEncoder | None = None,
                 reranker: Reranker | None = None, prefetch_factor: int = 4):
        self.search = search
        self.embed_query = embed_query
        self.sparse = sparse or SparseEncoder()
        self.reranker = reranker
        self.prefetch_factor = prefetch_factor

    async def retrieve(self, query: str, options: RetrievalOptions, exact: bool = False) -> list[Passage]:
        dense = await self.embed_query(query) if options.mode in ("hybrid", "dense") else None
        sparse = self.sparse.query(query) if options.mode in ("hybrid", "sparse") else None
        if sparse is not None and not sparse[0]:
            sparse = None if options.mode == "hybrid" else sparse  # only stopwords: dense alone decides
        mode = "dense" if options.mode == "hybrid" and sparse is None else options.mode
        hits = await self.search(
            options.collection, dense=dense, sparse=sparse, mode=mode, limit=options.top_k,
            prefetch_limit=max(options.top_k * self.prefetch_factor, 50),
            filter=options.filter.to_store() if options.filter else None, exact=exact)
        passages = [Passage.from_hit(i, hit) for i, hit in enumerate(hits, start=1)]
        return self.reranker.rerank(query, passages) if self.reranker and passages else passages


RAG_INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. Cite the sources you use in square "
    "brackets, like [1]. If the sources do not contain the answer, say that you do not know."
)


def rag_messages(messages: list[dict[str, Any]], passages: list[Passage],
                 max_context_chars: int) -> tuple[list[dict], list[Passage]]:
    """``messages`` with the numbered passages (within ``max_context_chars``) in the system message,
    and the passages that made it into the context (the ones that can be cited)."""
    blocks, used, cited = [], 0, []
    for p in passages:
        where = p.title or p.path or p.source
        if p.page:
            where += f", page {p.page}"
        block = f"[{p.rank}] {where}\n{p.text}"
        if used + len(block) > max_context_chars:
            block = block[: max(max_context_chars - used, 0)]
            if len(block) < 80:
                break
        blocks.append(block)
        cited.append(p)
        used += len(block)
    system = RAG_INSTRUCTIONS + "\n\nSources:\n\n" + "\n\n".join(blocks)
    rest = list(messages)
    if rest and rest[0].get("role") == "system":
        system = f"{rest[0]['content']}\n\n{system}"
        rest = rest[1:]
    return [{"role": "system", "content": system}, *rest], cited
