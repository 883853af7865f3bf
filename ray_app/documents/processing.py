"""One document's way into a collection, step by step, for both ingestion paths: the Ray Data
pipeline (each stage calls a step per row) and single-file uploads over HTTP (``KnowledgeBase``
chains the steps for one file).

size check -> version (the content hash against the stored one) -> parse -> OCR of the pages that
need it -> chunk -> sparse vectors -> records. A step that cannot go on raises ``RefusedFile``, so
both paths refuse a file with the same code and message. The heavy engines are the caller's: OCR
(``ocr_elements`` runs in the pipeline's OCR actors and in the ``OCR`` deployment for uploads) and
the dense embedder; both are placed on their own resources.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ray_app.documents.chunk import Chunk, TokenChunker
from ray_app.documents.config import DocumentLimits, OCRConfig
from ray_app.documents.ocr import OCRError, TesseractOCR, TooLarge
from ray_app.documents.parse import DocumentParser, Element, ParsedDocument, RefusedFile
from ray_app.documents.report import FileOutcome, Status
from ray_app.documents.sources import content_hash
from ray_app.documents.sparse import SparseEncoder
from ray_app.documents.store import PointRecord, point_id

SparseVector = tuple[list[int], list[float]]


@dataclass
class DocMeta:
    """What a document's chunks say about it, filled in by the steps; also its line in a report."""

    doc_id: str
    source: str
    path: str
    sensitivity: str
    doc_hash: str = ""
    format: str | None = None
    title: str | None = None
    page_count: int | None = None
    ocr_pages: int = 0

    def outcome(self, status: Status, chunks: int = 0, code: str | None = None,
                reason: str | None = None) -> FileOutcome:
        return FileOutcome(source=self.source, path=self.path, status=status, code=code, reason=reason,
                           doc_id=self.doc_id, chunks=chunks, pages=self.page_count, ocr_pages=self.ocr_pages,
                           sensitivity=self.sensitivity)


@dataclass(frozen=True)
class DocumentSettings:
    """What shapes a document's chunks (its fingerprint) and what one document may cost."""

    embedder: str
    max_tokens: int
    overlap: int
    ocr: OCRConfig
    limits: DocumentLimits
    max_bytes: int

    @property
    def fingerprint(self) -> str:
        """Part of every content hash: changing one of these settings re-ingests every document."""
        return json.dumps({"embedder": self.embedder, "max_tokens": self.max_tokens, "overlap": self.overlap,
                           "ocr": self.ocr.model_dump(exclude={"threads"}), "v": 1}, sort_keys=True)


class DocumentSteps:
    """The steps, each a method on one document. ``tokenizer`` (the embedder's, which chunks are
    counted in) is needed by ``chunk`` only: the pipeline's parse actors go without it."""

    def __init__(self, settings: DocumentSettings, tokenizer=None):
        self.settings = settings
        self.fingerprint = settings.fingerprint
        self.parser = DocumentParser(settings.ocr, settings.limits)
        self.chunker = TokenChunker(tokenizer, settings.max_tokens, settings.overlap) if tokenizer is not None else None
        self.sparse = SparseEncoder()

    def check_size(self, size: int) -> None:
        if size > self.settings.max_bytes:
            raise RefusedFile("too_large", f"{size} bytes is over the limit of {self.settings.max_bytes} bytes")

    def version(self, meta: DocMeta, data: bytes,
                known: tuple[str, str | None] | None) -> Literal["unchanged", "relabelled"] | None:
        """Sets ``meta.doc_hash``; ``known`` is the stored version's (hash, label). Unchanged or
        relabelled (the same bytes with a new label) when the collection holds these bytes already."""
        meta.doc_hash = content_hash(data, self.fingerprint)
        if known is None or known[0] != meta.doc_hash:
            return None
        return "unchanged" if known[1] == meta.sensitivity else "relabelled"

    def parse(self, meta: DocMeta, data: bytes) -> ParsedDocument:
        try:
            parsed = self.parser.parse(meta.path, data)
        except RefusedFile:
            raise
        except Exception as e:  # a parser crashing on one file must not take a batch (or a replica) down
            raise RefusedFile("parse_error", f"{type(e).__name__}: {e}") from None
        meta.format, meta.title, meta.page_count = parsed.format, parsed.title, parsed.page_count
        meta.ocr_pages = len(parsed.ocr_pages)
        return parsed

    def chunk(self, parsed: ParsedDocument) -> list[Chunk]:
        """The document's chunks, after OCR; refuses a document without text or with too many chunks."""
        chunks = self.chunker.chunk(parsed.elements)
        if not chunks:
            raise _no_text(parsed)
        if len(chunks) > self.settings.limits.max_chunks:
            raise RefusedFile("too_large", f"{len(chunks)} chunks is over the limit of "
                                           f"{self.settings.limits.max_chunks}")
        return chunks

    def sparse_vectors(self, chunks: list[Chunk]) -> list[SparseVector]:
        return [self.sparse.document(chunk.text) for chunk in chunks]


def ocr_elements(parsed: ParsedDocument, data: bytes, ocr: TesseractOCR) -> list[Element]:
    """OCR the pages ``parse`` could not read; refuses the file if, after OCR, it holds no text at all."""
    if parsed.ocr_pages:
        try:
            pages = ocr.pdf(data, parsed.ocr_pages) if parsed.format == "pdf" else ocr.frames(data)
        except TooLarge as e:
            raise RefusedFile(e.code, e.message) from None
        except OCRError as e:
            raise RefusedFile("ocr_error", f"OCR failed: {e}") from None
        except Exception as e:
            raise RefusedFile("ocr_error", f"OCR failed: {type(e).__name__}") from None
        for page in pages:
            for block in _paragraphs(page):
                parsed.elements.append(Element(block, "OCRText", page.page))
        parsed.elements.sort(key=lambda e: e.page or 0)
    if not parsed.elements:
        raise _no_text(parsed)
    return parsed.elements


def _no_text(parsed: ParsedDocument) -> RefusedFile:
    what = "image" if parsed.format == "image" else "document"
    return RefusedFile("no_text", f"no text found in the {what}" + (", with OCR" if parsed.ocr_pages else ""))


def _paragraphs(page) -> list[str]:
    """OCR lines grouped into paragraphs where the vertical gap is larger than a line height."""
    blocks: list[list[str]] = []
    previous = None
    for line in page.lines:
        height = line.box[3] - line.box[1]
        if previous is None or line.box[1] - previous.box[3] > max(height, 1) * 1.2:
            blocks.append([])
        blocks[-1].append(line.text)
        previous = line
    return ["\n".join(b) for b in blocks if any(t.strip() for t in b)]


def build_records(meta: DocMeta, chunks: list[Chunk], dense: np.ndarray, sparse: list[SparseVector],
                  ingested_at: str | None = None) -> list[PointRecord]:
    ingested_at = ingested_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    records = []
    for chunk, vector, (indices, values) in zip(chunks, dense, sparse):
        payload = {
            "doc_id": meta.doc_id, "source": meta.source, "path": meta.path, "title": meta.title,
            "format": meta.format, "sensitivity": meta.sensitivity, "doc_hash": meta.doc_hash,
            "chunk_index": chunk.index, "chunk_count": len(chunks), "text": chunk.text,
            "page": chunk.page, "page_end": chunk.page_end, "element_types": chunk.element_types,
            "char_start": chunk.char_start, "char_end": chunk.char_end, "content_hash": chunk.content_hash,
            "tokens": chunk.tokens, "ingested_at": ingested_at,
        }
        records.append(PointRecord(point_id(meta.doc_id, chunk.index, chunk.content_hash),
                                   [float(x) for x in vector], indices, values, payload))
    return records
