"""OCR with Tesseract (Debian's ``tesseract-ocr``): text lines with boxes and confidence.

One class, used by the ingestion pipeline's OCR stage and by the ``/v1/ocr`` deployment. Tesseract
runs as a subprocess reading PNG from stdin and writing TSV (word boxes); words are grouped into lines
here. ``OMP_THREAD_LIMIT`` is set for the subprocess only: with several OpenMP threads a page took
2.7-43 s on this machine, with one 2.1-2.9 s.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

from PIL import Image

from ray_app.documents.config import OCRConfig


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


def render_pdf_pages(data: bytes, dpi: int, pages: list[int] | None = None) -> list[tuple[int, Image.Image]]:
    """(1-based page number, grayscale image) for ``pages`` (default: all) of a PDF."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(data)
    try:
        numbers = pages or list(range(1, len(pdf) + 1))
        return [(n, pdf[n - 1].render(scale=dpi / 72, grayscale=True).to_pil()) for n in numbers]
    finally:
        pdf.close()


class TesseractOCR:
    def __init__(self, config: OCRConfig | None = None, binary: str = "tesseract"):
        self.config = config or OCRConfig()
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
        proc = subprocess.run(cmd, input=to_png(image), capture_output=True, env=self._env, timeout=300)
        if proc.returncode != 0:
            raise OCRError(f"tesseract failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
        return OCRPage(page=page, width=image.width, height=image.height,
                       lines=self._lines(proc.stdout.decode("utf-8", errors="replace")))

    def pdf(self, data: bytes) -> list[OCRPage]:
        dpi = self.config.dpi
        return [self.image(image, page=n, dpi=dpi) for n, image in render_pdf_pages(data, dpi)]

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
