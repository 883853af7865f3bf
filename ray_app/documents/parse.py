"""Turn a file's bytes into elements (text, element type, page), or refuse it with a reason.

PDF text layers are read with pypdfium2 (fast, permissive licence); PDF pages without a text layer and
images are handed on to OCR as rendered pages. DOCX, HTML, Markdown and plain text go through
``unstructured``. Tables are kept as text rows (``cell | cell``), never dropped.

Hostile files are refused before they cost memory (``DocumentLimits``): a PDF's page count and the
pixels its OCR pages would render to, an image's declared size and frame count, and what a DOCX's zip
members inflate to (read through, capped, before unstructured opens it).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from ray_app.documents.config import DocumentLimits, OCRConfig

RefusalCode = Literal["empty", "too_large", "too_many_pages", "unsupported_type", "corrupt", "encrypted",
                      "undecodable", "no_text", "read_error", "parse_error", "ocr_error"]

PDF_EXTENSIONS = {".pdf"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
UNSTRUCTURED_EXTENSIONS = {".docx": "docx", ".html": "html", ".htm": "html", ".md": "md", ".markdown": "md",
                           ".txt": "text", ".text": "text"}
SUPPORTED_EXTENSIONS = PDF_EXTENSIONS | IMAGE_EXTENSIONS | set(UNSTRUCTURED_EXTENSIONS)


class RefusedFile(Exception):
    """A file that cannot be ingested; ``code`` is machine-readable, the message says why."""

    def __init__(self, code: RefusalCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):
        return type(self), (self.code, self.message)


@dataclass
class Element:
    text: str
    type: str  # unstructured's category (Title, NarrativeText, Table, ListItem, ...) or PageText / OCRText
    page: int | None = None


@dataclass
class ParsedDocument:
    format: str
    elements: list[Element] = field(default_factory=list)
    ocr_pages: list[int] = field(default_factory=list)  # 1-based pages (or image frames) that need OCR
    page_count: int | None = None
    title: str | None = None


def file_format(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in PDF_EXTENSIONS:
        return "pdf"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in UNSTRUCTURED_EXTENSIONS:
        return UNSTRUCTURED_EXTENSIONS[suffix]
    raise RefusedFile("unsupported_type", f"unsupported file type {suffix or '(no extension)'!r}; supported: "
                                          f"{', '.join(sorted(SUPPORTED_EXTENSIONS))}")


_unstructured_ready = False


def _offline_unstructured() -> None:
    """Give unstructured an offline sentence pipeline instead of en_core_web_sm.

    unstructured 0.27 classifies elements with spaCy's en_core_web_sm and downloads it from GitHub on
    first use, which fails without internet (and no trustworthy copy is on the package index). A blank
    English pipeline with spaCy's rule-based sentencizer keeps every structural category (Title, Table,
    ListItem, ...); what is lost is the part-of-speech check, so body paragraphs are reported as
    UncategorizedText rather than NarrativeText. Element types are metadata here: retrieval does not
    depend on them.
    """
    global _unstructured_ready
    if _unstructured_ready:
        return
    import spacy
    import unstructured.nlp.tokenize as tokenize

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    tokenize._get_nlp = lambda: nlp  # replaces the cached downloader (a pinned unstructured==0.27.32)
    _unstructured_ready = True


def table_rows(html: str) -> str:
    """A table as text rows: one line per row, cells joined by `` | ``."""
    from lxml import html as lxml_html

    tree = lxml_html.fromstring(html)
    rows = []
    for tr in tree.iter("tr"):
        cells = [" ".join(cell.text_content().split()) for cell in tr if cell.tag in ("td", "th")]
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


def decode_text(data: bytes) -> str:
    """Text files: UTF-8 (with or without BOM), UTF-16 with BOM, else a charset guess; refused when
    the result is mostly control characters (a binary file with a text name)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            from charset_normalizer import from_bytes

            best = from_bytes(data).best()
            text = str(best) if best is not None else ""
    control = sum(not (c.isprintable() or c.isspace()) for c in text)
    if not text or control > len(text) * 0.01:
        raise RefusedFile("undecodable", "not decodable as text (tried UTF-8, UTF-16 and charset detection)")
    return text


def check_zip(data: bytes, limits: DocumentLimits) -> None:
    """Refuse a zip (DOCX) that has too many members or inflates past the cap: the declared sizes
    first, then the real ones, counted while inflating and stopped at the cap (headers can lie)."""
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise RefusedFile("corrupt", f"not a valid DOCX (zip) file ({e})") from None
    with archive:
        members = archive.infolist()
        if len(members) > limits.max_archive_members:
            raise RefusedFile("too_large", f"{len(members)} members in the DOCX, over the limit of "
                                           f"{limits.max_archive_members}")
        limit = limits.max_inflated_bytes
        if sum(m.file_size for m in members) > limit:
            raise RefusedFile("too_large", f"the DOCX inflates to more than {limit:,} bytes")
        total = 0
        try:
            for member in members:
                with archive.open(member) as stream:
                    while block := stream.read(1 << 20):
                        total += len(block)
                        if total > limit:
                            raise RefusedFile("too_large", f"the DOCX inflates to more than {limit:,} bytes")
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise RefusedFile("corrupt", f"corrupt DOCX member ({type(e).__name__})") from None


class DocumentParser:
    def __init__(self, ocr: OCRConfig | None = None, limits: DocumentLimits | None = None):
        self.ocr = ocr or OCRConfig()
        self.limits = limits or DocumentLimits()

    def parse(self, name: str, data: bytes) -> ParsedDocument:
        fmt = file_format(name)
        if not data:
            raise RefusedFile("empty", "empty file (0 bytes)")
        if fmt == "pdf":
            return self._pdf(data)
        if fmt == "image":
            return self._image(data)
        return self._unstructured(fmt, name, data)

    def _pdf(self, data: bytes) -> ParsedDocument:
        import pypdfium2 as pdfium

        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as e:
            if "password" in str(e).lower():
                raise RefusedFile("encrypted", "encrypted PDF (a password is needed to open it)") from None
            raise RefusedFile("corrupt", f"corrupt or truncated PDF ({e})") from None
        try:
            if len(pdf) == 0:
                raise RefusedFile("corrupt", "PDF has no pages")
            if len(pdf) > self.limits.max_pages:
                raise RefusedFile("too_many_pages", f"{len(pdf)} pages is over the limit of {self.limits.max_pages}")
            doc = ParsedDocument(format="pdf", page_count=len(pdf))
            title = (pdf.get_metadata_dict() or {}).get("Title")
            doc.title = title.strip() if title and title.strip() else None
            for number in range(1, len(pdf) + 1):
                page = pdf[number - 1]
                textpage = page.get_textpage()
                text = textpage.get_text_range().replace("\r\n", "\n").replace("\r", "\n")
                if len(text.strip()) < self.ocr.min_text_chars:
                    from ray_app.documents.ocr import page_pixels

                    pixels = page_pixels(*page.get_size(), self.ocr.dpi)
                    if pixels > self.limits.max_page_pixels:
                        raise RefusedFile("too_large", f"page {number} needs OCR and would be {pixels:,} pixels at "
                                                       f"{self.ocr.dpi} dpi, over the limit of "
                                                       f"{self.limits.max_page_pixels:,}")
                    doc.ocr_pages.append(number)
                    continue
                for block in re.split(r"\n\s*\n", text):
                    if block.strip():
                        doc.elements.append(Element(block.strip(), "PageText", number))
            return doc
        finally:
            pdf.close()

    def _image(self, data: bytes) -> ParsedDocument:
        from PIL import Image, ImageSequence, UnidentifiedImageError

        from ray_app.documents.ocr import TooLarge, open_image

        try:
            image = open_image(data, self.limits)  # the header only: the declared size is checked first
            frames = 0
            for frames, _ in enumerate(ImageSequence.Iterator(image), start=1):
                if frames > self.limits.max_frames:
                    raise RefusedFile("too_many_pages", f"more than {self.limits.max_frames} frames")
            Image.open(io.BytesIO(data)).verify()  # detects truncated and corrupt files
        except TooLarge as e:
            raise RefusedFile(e.code, e.message) from None
        except Image.DecompressionBombError as e:
            raise RefusedFile("too_large", str(e)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise RefusedFile("corrupt", f"unreadable image ({e})") from None
        return ParsedDocument(format="image", page_count=frames, ocr_pages=list(range(1, frames + 1)))

    def _unstructured(self, fmt: str, name: str, data: bytes) -> ParsedDocument:
        if fmt == "docx":
            check_zip(data, self.limits)
        _offline_unstructured()
        try:
            if fmt == "docx":
                from unstructured.partition.docx import partition_docx

                elements = partition_docx(file=io.BytesIO(data))
            else:
                text = decode_text(data)
                if fmt == "html":
                    from unstructured.partition.html import partition_html

                    elements = partition_html(text=text)
                elif fmt == "md":
                    from unstructured.partition.md import partition_md

                    elements = partition_md(text=text)
                else:
                    from unstructured.partition.text import partition_text

                    elements = partition_text(text=text)
        except RefusedFile:
            raise
        except Exception as e:  # a broken file must not take the batch down
            code: RefusalCode = "corrupt" if fmt == "docx" else "parse_error"
            raise RefusedFile(code, f"could not parse {fmt}: {type(e).__name__}: {e}") from None
        doc = ParsedDocument(format=fmt)
        for el in elements:
            text = el.text or ""
            if el.category == "Table" and el.metadata.text_as_html:
                text = table_rows(el.metadata.text_as_html) or text
            if text.strip():
                doc.elements.append(Element(text.strip(), el.category, el.metadata.page_number))
            if doc.title is None and el.category == "Title" and text.strip():
                doc.title = text.strip()
        pages = [e.page for e in doc.elements if e.page is not None]
        doc.page_count = max(pages) if pages else None
        if not doc.elements:
            raise RefusedFile("no_text", f"no text found in the {fmt} file")
        return doc
