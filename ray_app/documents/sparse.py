"""BM25-style sparse vectors, computed with Qdrant's own BM25 tokenizer (``qdrant_edge.Bm25``).

Documents get term-frequency weights with length normalisation; queries get weight 1 per term; the
collection's IDF modifier makes Qdrant apply IDF at query time, so the same vectors work for the
embedded engine and for a Qdrant server. Ingest and query must use the same settings: they are fixed
here, not configurable per call.
"""

from __future__ import annotations

# Chunks hold ~254 WordPiece tokens, about 190 English words: the expected length BM25 normalises by.
AVERAGE_WORDS = 190.0


class SparseEncoder:
    def __init__(self, language: str = "english"):
        import qdrant_edge

        self._bm25 = qdrant_edge.Bm25(qdrant_edge.Bm25Config(language=language, avg_len=AVERAGE_WORDS))

    def document(self, text: str) -> tuple[list[int], list[float]]:
        vector = self._bm25.embed_document(text)
        return list(vector.indices), [float(v) for v in vector.values]

    def query(self, text: str) -> tuple[list[int], list[float]]:
        vector = self._bm25.embed_query(text)
        return list(vector.indices), [float(v) for v in vector.values]
