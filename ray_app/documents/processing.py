"""The per-document steps shared by the Ray Data pipeline and by single-file uploads over HTTP:
OCR of the pages that need it, and turning chunks plus vectors into store records."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import numpy as np

from ray_app.documents.chunk import Chunk
from ray_app.documents.ocr import OCRError, TesseractOCR, TooLarge
from ray_app.documents.parse import Element, ParsedDocument, RefusedFile
from ray_app.documents.store import PointRecord, point_id


@dataclass
class DocMeta:
    doc_id: str
    source: str
    path: str
    sensitivity: str
    doc_hash: str
    format: str | None = None
    title: str | None = None
    page_count: int | None = None
    ocr_pages: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


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
        what = "image" if parsed.format == "image" else "document"
        raise RefusedFile("no_text", f"no text found in the {what}, with OCR")
    return parsed.elements


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


def build_records(meta: DocMeta, chunks: list[Chunk], dense: np.ndarray,
                  sparse: list[tuple[list[int], list[float]]], ingested_at: str | None = None) -> list[PointRecord]:
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
