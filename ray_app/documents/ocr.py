"""OCR with Tesseract (Debian's ``tesseract-ocr``): text lines with boxes and confidence.

One class, used by the ingestion pipeline's OCR stage and by the ``/v1/ocr`` deployment. Tesseract
runs as a subprocess reading PNG from stdin and writing TSV (word boxes); words are grouped into lines
here. ``OMP_THREAD_LIMIT`` is set for the subprocess only: with several OpenMP threads a page took
2.7-43 s on this machine, with one 2.1-2.9 s.

Pages and frames are rendered one at a time, each checked against ``DocumentLimits`` before it is
decoded, so a document's memory is one page whatever its page count or declared size.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

from PIL import Image

from ray_app.documents.config import DocumentLimits, OCRConfig


class OCRError(RuntimeError):
    """Tesseract is missing or failed on an input."""


@dataclass
class OCRWord:
    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the OCR'd image
    confidence: float  # 0-100


@dataclass
class OCRLine:
    text: str
    box: tuple[int, int, int, int]
    confidence: float  # mean word confidence, 0-100
    words: list[OCRWord] = field(default_factory=list)


@dataclass
class OCRPage:
    page: int
    width: int
    height: int
    lines: list[OCRLine] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def confidence(self) -> float | None:
        words = [line.confidence for line in self.lines]
        return round(sum(words) / len(words), 2) if words else None

    def to_dict(self) -> dict:
        return {"page": self.page, "width": self.width, "height": self.height, "text": self.text,
                "confidence": self.confidence, "lines": [asdict(line) for line in self.lines]}


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class TooLarge(Exception):
    """A page or frame over ``DocumentLimits``; ``code`` is the refusal code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def page_pixels(width_pt: float, height_pt: float, dpi: int) -> int:
    return int(width_pt * dpi / 72) * int(height_pt * dpi / 72)


def iter_pdf_pages(data: bytes, dpi: int, limits: DocumentLimits, pages: list[int] | None = None):
    """(1-based page number, grayscale image) for ``pages`` (default: all) of a PDF, rendered one at a
    time; raises ``TooLarge`` before rendering a page over the pixel cap."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        if len(pdf) > limits.max_pages:
            raise TooLarge("too_many_pages", f"{len(pdf)} pages is over the limit of {limits.max_pages}")
        for n in pages or range(1, len(pdf) + 1):
            page = pdf[n - 1]
            pixels = page_pixels(*page.get_size(), dpi)
            if pixels > limits.max_page_pixels:
                raise TooLarge("too_large", f"page {n} would be {pixels:,} pixels at {dpi} dpi, over the limit of "
                                            f"{limits.max_page_pixels:,}")
            image = page.render(scale=dpi / 72, grayscale=True).to_pil()
            page.close()
            yield n, image
    finally:
        pdf.close()


def open_image(data: bytes, limits: DocumentLimits) -> Image.Image:
    """An image opened (header only) and checked against the pixel cap before anything is decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own ceiling, far above ours: the same refusal
        raise TooLarge("too_large", f"the image declares more than {limits.max_page_pixels:,} pixels") from None
    if image.width * image.height > limits.max_page_pixels:
        raise TooLarge("too_large", f"image of {image.width}x{image.height} pixels is over the limit of "
                                    f"{limits.max_page_pixels:,}")
    return image


def iter_frames(data: bytes, limits: DocumentLimits):
    """(1-based frame number, image) of a single- or multi-frame image, at most ``limits.max_frames``."""
    from PIL import ImageSequence

    image = open_image(data, limits)
    if getattr(image, "n_frames", 1) > limits.max_frames:  # counted from the headers, before any OCR
        raise TooLarge("too_many_pages", f"{image.n_frames} frames is over the limit of {limits.max_frames}")
    for n, frame in enumerate(ImageSequence.Iterator(image), start=1):
        if n > limits.max_frames:
            raise TooLarge("too_many_pages", f"more than {limits.max_frames} frames")
        if frame.width * frame.height > limits.max_page_pixels:
            raise TooLarge("too_large", f"frame {n} is over the limit of {limits.max_page_pixels:,} pixels")
        yield n, frame.copy()


class TesseractOCR:
    def __init__(self, config: OCRConfig | None = None, binary: str = "tesseract",
                 limits: DocumentLimits | None = None):
        self.config = config or OCRConfig()
        self.limits = limits or DocumentLimits()
        path = shutil.which(binary)
        if path is None:
            raise OCRError(f"{binary!r} is not installed: `apt-get install tesseract-ocr tesseract-ocr-eng` "
                           "(scripts/setup.sh does this)")
        self.binary = path
        self._env = {**os.environ, "OMP_THREAD_LIMIT": str(self.config.threads)}

    def image(self, image: Image.Image | bytes, page: int = 1, dpi: int | None = None) -> OCRPage:
        """OCR one image; ``dpi`` when known (rendered PDF pages), else Tesseract estimates it."""
        if isinstance(image, bytes):
            image = Image.open(io.BytesIO(image))
        image = image.convert("L")
        cmd = [self.binary, "stdin", "stdout", "-l", self.config.languages, "--psm", str(self.config.psm)]
        cmd += ["--dpi", str(dpi)] if dpi else []
        cmd += ["tsv"]
        try:
            proc = subprocess.run(cmd, input=to_png(image), capture_output=True, env=self._env,
                                  timeout=self.limits.ocr_page_timeout_s)
        except subprocess.TimeoutExpired:
            raise OCRError(f"tesseract took more than {self.limits.ocr_page_timeout_s:g} s on page {page}") from None
        if proc.returncode != 0:
            raise OCRError(f"tesseract failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
        return OCRPage(page=page, width=image.width, height=image.height,
                       lines=self._lines(proc.stdout.decode("utf-8", errors="replace")))

    def pdf(self, data: bytes, pages: list[int] | None = None) -> list[OCRPage]:
        dpi = self.config.dpi
        return [self.image(image, page=n, dpi=dpi) for n, image in iter_pdf_pages(data, dpi, self.limits, pages)]

    def frames(self, data: bytes) -> list[OCRPage]:
        """Every frame of an image (a multi-page TIFF is a scanned document)."""
        return [self.image(frame, page=n) for n, frame in iter_frames(data, self.limits)]

    def _lines(self, tsv: str) -> list[OCRLine]:
        lines: dict[tuple[int, int, int], list[OCRWord]] = {}
        for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
            text = (row.get("text") or "").strip()
            if row.get("level") != "5" or not text:
                continue
            confidence = float(row["conf"])
            if confidence < self.config.min_confidence:
                continue
            key = (int(row["block_num"]), int(row["par_num"]), int(row["line_num"]))
            left, top = int(row["left"]), int(row["top"])
            lines.setdefault(key, []).append(OCRWord(
                text, (left, top, left + int(row["width"]), top + int(row["height"])), confidence))
        out = []
        for words in lines.values():
            boxes = [w.box for w in words]
            out.append(OCRLine(
                text=" ".join(w.text for w in words),
                box=(min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)),
                confidence=round(sum(w.confidence for w in words) / len(words), 2),
                words=words,
            ))
        return out
