"""Split a document's elements into overlapping chunks measured in the embedder's own tokens.

The document text is the elements joined by blank lines. Within each page (a chunk never crosses a
page break, so a citation names one page), windows of ``max_tokens`` tokens move by
``max_tokens - overlap``; window edges are moved to word starts so no chunk begins or ends inside a
word. Each chunk keeps its character span in the document text, its page and the element types it
contains.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ray_app.documents.parse import Element

SEPARATOR = "\n\n"
_SNAP = 8  # how many tokens an edge may move to reach a word start


@dataclass
class Chunk:
    index: int
    text: str
    char_start: int
    char_end: int
    page: int | None
    page_end: int | None
    element_types: list[str]
    tokens: int

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:32]


class TokenChunker:
    def __init__(self, tokenizer, max_tokens: int, overlap_tokens: int):
        if not 0 <= overlap_tokens < max_tokens:
            raise ValueError(f"overlap ({overlap_tokens}) must be >= 0 and < max_tokens ({max_tokens})")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap_tokens

    def chunk(self, elements: list[Element]) -> list[Chunk]:
        text, spans = self._join(elements)
        chunks: list[Chunk] = []
        for group in self._by_page(spans):
            self._window(text, group, chunks)
        return chunks

    @staticmethod
    def _by_page(spans: list[tuple[int, int, Element]]) -> list[list[tuple[int, int, Element]]]:
        groups: list[list[tuple[int, int, Element]]] = []
        for span in spans:
            if groups and groups[-1][-1][2].page == span[2].page:
                groups[-1].append(span)
            else:
                groups.append([span])
        return groups

    def _window(self, text: str, group: list[tuple[int, int, Element]], chunks: list[Chunk]) -> None:
        base, stop = group[0][0], group[-1][1]
        piece = text[base:stop]
        if not piece.strip():
            return
        offsets = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True,
                                 verbose=False)["offset_mapping"]
        n = len(offsets)
        word_start = [i == 0 or offsets[i][0] > offsets[i - 1][1] or piece[offsets[i][0] - 1].isspace()
                      for i in range(n)]
        start = 0
        while start < n:
            end = min(start + self.max_tokens, n)
            if end < n:
                # end before a word start, so the next chunk does not begin mid-word
                for candidate in range(end, max(end - _SNAP, start + 1), -1):
                    if word_start[candidate]:
                        end = candidate
                        break
            char_start, char_end = base + offsets[start][0], base + offsets[end - 1][1]
            covered = [s for s in group if s[0] < char_end and s[1] > char_start]
            page = group[0][2].page
            chunks.append(Chunk(
                index=len(chunks), text=text[char_start:char_end], char_start=char_start, char_end=char_end,
                page=page, page_end=page, element_types=sorted({s[2].type for s in covered}), tokens=end - start,
            ))
            if end == n:
                return
            next_start = max(end - self.overlap, start + 1)
            for candidate in range(next_start, min(next_start + _SNAP, end)):
                if word_start[candidate]:
                    next_start = candidate
                    break
            start = next_start

    @staticmethod
    def _join(elements: list[Element]) -> tuple[str, list[tuple[int, int, Element]]]:
        parts, spans, position = [], [], 0
        for element in elements:
            if parts:
                parts.append(SEPARATOR)
                position += len(SEPARATOR)
            parts.append(element.text)
            spans.append((position, position + len(element.text), element))
            position += len(element.text)
        return "".join(parts), spans
