"""The ``OCR`` deployment: a thin Serve wrapper over ``TesseractOCR`` (the ingestion pipeline's class)."""

from __future__ import annotations

import asyncio

from ray import serve

from ray_app.documents.ocr import OCRError, TesseractOCR, TooLarge
from ray_app.documents.parse import Element, ParsedDocument, RefusedFile, file_format
from ray_app.documents.processing import ocr_elements
from ray_app.serve.config import OCRServeConfig


class OCRServer:
    def __init__(self, config: OCRServeConfig):
        self.ocr = TesseractOCR(config.ocr, limits=config.limits)
        # Tesseract runs as a subprocess per page: bound how many run at once on this replica.
        self._slots = asyncio.Semaphore(config.concurrency)

    async def recognize(self, filename: str, data: bytes) -> list[dict]:
        """Every page of an image or PDF: text, per-line boxes and confidence."""
        fmt = file_format(filename)
        if fmt not in ("pdf", "image"):
            raise RefusedFile("unsupported_type", f"OCR takes an image or a PDF, not {fmt!r}")
        async with self._slots:
            try:
                pages = await asyncio.to_thread(self.ocr.pdf if fmt == "pdf" else self.ocr.frames, data)
            except TooLarge as e:
                raise RefusedFile(e.code, e.message) from None
            except OCRError as e:
                raise RefusedFile("ocr_error", str(e)) from None
            except Exception as e:
                raise RefusedFile("corrupt", f"cannot read the {fmt} ({type(e).__name__})") from None
        return [p.to_dict() for p in pages]

    async def elements(self, parsed: ParsedDocument, data: bytes) -> list[Element]:
        """The OCR step of an upload: the parsed document's elements plus the OCR'd pages."""
        async with self._slots:
            return await asyncio.to_thread(ocr_elements, parsed, data, self.ocr)


def build_ocr_deployment(config: OCRServeConfig):
    return serve.deployment(OCRServer).options(name="OCR", **config.replicas.serve_options()).bind(config)
