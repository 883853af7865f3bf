"""Hostile files, generated small: what a decompression bomb or a resource-exhaustion upload looks like.

Each is cheap to make and would cost gigabytes or hours if parsed naively; the parser and OCR must
refuse it with a code before that happens.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF from its object bodies (object i is ``objects[i - 1]``), with a correct xref table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def many_pages_pdf(pages: int = 20_000) -> bytes:
    """A PDF of ``pages`` empty pages (one page object, referenced that many times): ~120 KB."""
    kids = b" ".join([b"3 0 R"] * pages)
    return _pdf([b"<< /Type /Catalog /Pages 2 0 R >>",
                 b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
                 b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"])


def huge_page_pdf(points: int = 14_400) -> bytes:
    """One empty page of ``points`` x ``points`` (the PDF maximum): 40,000 x 40,000 pixels at 200 dpi."""
    return _pdf([b"<< /Type /Catalog /Pages 2 0 R >>",
                 b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                 b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] >>" % (points, points)])


def zip_bomb_docx(inflated_bytes: int = 300 * 1024 * 1024) -> bytes:
    """A DOCX whose document part inflates to ``inflated_bytes`` of zeros (deflated to ~1/1000)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.'
                                                'org/package/2006/content-types"/>')
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            block = b"\0" * (1 << 20)
            for _ in range(inflated_bytes // len(block)):
                member.write(block)
    return out.getvalue()


def many_frames_tiff(frames: int = 1000) -> bytes:
    """A multi-page TIFF of ``frames`` tiny blank frames."""
    from PIL import Image

    images = [Image.new("L", (16, 16), 255) for _ in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format="TIFF", save_all=True, append_images=images[1:])
    return out.getvalue()


def huge_declared_png(side: int = 60_000) -> bytes:
    """A PNG whose header declares ``side`` x ``side`` pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(
        b"IEND", b"")
