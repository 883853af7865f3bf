"""A small document corpus built from known text: every format the pipeline reads, plus broken files.

Used by the document tests (exact expectations) and by the ingestion benchmark (``scaled_corpus``).
Facts are unique per file so a question has exactly one right document.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class Fact:
    file: str
    question: str
    answer: str  # a phrase the right chunk contains
    page: int | None = None


FACTS = [
    Fact("handbook.pdf", "How many vacation days do employees receive?", "27 days of paid vacation", page=2),
    Fact("scanned_memo.pdf", "What is the parking garage access code?", "garage access code is 4417", page=1),
    Fact("receipt.png", "What did quarterly revenue reach?", "revenue reached 12 million euros", page=1),
    Fact("offices.docx", "Which office does Dana work in?", "Dana | Lisbon"),
    Fact("refunds.html", "How long is the refund window?", "refund window is 45 days"),
    Fact("onboarding.md", "When does the new laptop arrive?", "laptop arrives on day three"),
    Fact("cafeteria.txt", "When does the cafeteria open?", "cafeteria opens at 7:30"),
]

FILLER = ("Policies are reviewed every year by the operations team. Questions go to the people desk. "
          "Records are kept for seven years in the archive. ")


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def text_image(lines: list[str], size=(1700, 2200), font_size=38) -> Image.Image:
    """A page-like grayscale image of ``lines`` (what a scanner produces, without the noise)."""
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    y = 150
    for line in lines:
        draw.text((120, y), line, fill=0, font=_font(font_size))
        y += int(font_size * 1.8)
    return image


def text_pdf(pages: list[list[str]], encrypt: str | None = None, title: str | None = None) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4, encrypt=encrypt)
    if title:
        pdf.setTitle(title)
    for lines in pages:
        y = 780
        for line in lines:
            pdf.drawString(60, y, line)
            y -= 18
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def image_pdf(pages: list[list[str]]) -> bytes:
    """A 'scanned' PDF: pages are images, there is no text layer."""
    images = [text_image(lines).convert("RGB") for lines in pages]
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:], resolution=200)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def docx(paragraphs: list[str], table: list[list[str]]) -> bytes:
    import docx as python_docx

    document = python_docx.Document()
    document.add_heading("Office directory", level=1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    grid = document.add_table(rows=len(table), cols=len(table[0]))
    for r, row in enumerate(table):
        for c, value in enumerate(row):
            grid.cell(r, c).text = value
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def good_files() -> dict[str, bytes]:
    return {
        "handbook.pdf": text_pdf([
            ["Employee handbook", "Welcome to the company. " + FILLER[:60], FILLER[60:140]],
            ["Leave", "Full-time employees receive 27 days of paid vacation per year.", "Unused days carry over."],
        ], title="Employee handbook"),
        "scanned_memo.pdf": image_pdf([["Facilities memo", "The parking garage access code is 4417.",
                                        "It changes every quarter."]]),
        "receipt.png": png(text_image(["Finance update", "Quarterly revenue reached 12 million euros."],
                                      size=(1700, 700))),
        "offices.docx": docx(["Where our people sit, by name."],
                             [["Name", "Office"], ["Dana", "Lisbon"], ["Omar", "Nairobi"], ["Li", "Toronto"]]),
        "refunds.html": (b"<html><head><title>Refund policy</title></head><body><h1>Refund policy</h1>"
                         b"<p>Customers can return items. The refund window is 45 days from delivery.</p>"
                         b"<p>Refunds go back to the original payment method.</p></body></html>"),
        "onboarding.md": (b"# Onboarding\n\nYour first week is for meeting the team.\n\n"
                          b"## Equipment\n\nThe new laptop arrives on day three of your first week.\n\n"
                          b"- badge on day one\n- accounts on day two\n"),
        "cafeteria.txt": ("Cafeteria\n\nThe cafeteria opens at 7:30 on weekdays and serves lunch until 14:00. "
                          "Vegetarian dishes are marked in green.\n").encode(),
    }


def broken_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the refusal code the pipeline must report)."""
    good_pdf = text_pdf([["A perfectly fine first page with enough text to count as a text layer."]])
    noise = random.Random(1)
    return {
        "empty.txt": (b"", "empty"),
        "truncated.pdf": (good_pdf[: len(good_pdf) // 3], "corrupt"),
        "garbage.pdf": (b"%PDF-1.7\n" + bytes(noise.randrange(256) for _ in range(2000)), "corrupt"),
        "locked.pdf": (text_pdf([["Secret salaries."]], encrypt="hunter2"), "encrypted"),
        "archive.xyz": (b"PK\x03\x04 not something we read", "unsupported_type"),
        "binary.txt": (bytes(noise.randrange(256) for _ in range(4000)), "undecodable"),
        "blank.png": (png(Image.new("L", (800, 600), 255)), "no_text"),
    }


def make_corpus(root: Path, with_broken: bool = True) -> dict[str, str | None]:
    """Write the corpus under ``root``; returns file name -> expected refusal code (None: indexed)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, data in good_files().items():
        (root / name).write_bytes(data)
        expected[name] = None
    if with_broken:
        for name, (data, code) in broken_files().items():
            (root / name).write_bytes(data)
            expected[name] = code
    return expected


def scaled_corpus(root: Path, files: int = 200, seed: int = 0) -> dict[str, int]:
    """A mixed corpus of ``files`` documents for throughput measurements: mostly text formats, some
    scanned pages and images. Returns counts per format."""
    rng = random.Random(seed)
    words = (FILLER + " ".join(f.answer for f in FACTS)).split()
    counts: dict[str, int] = {}
    root.mkdir(parents=True, exist_ok=True)

    def paragraph(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    kinds = ["pdf"] * 5 + ["docx"] * 3 + ["html"] * 3 + ["md"] * 3 + ["txt"] * 4 + ["scan"] * 1 + ["png"] * 1
    for i in range(files):
        kind = kinds[i % len(kinds)]
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "pdf":
            pages = [[paragraph(12)[j:j + 90] for j in range(0, 700, 90)] for _ in range(rng.randint(1, 4))]
            (root / f"doc{i:04d}.pdf").write_bytes(text_pdf(pages))
        elif kind == "docx":
            (root / f"doc{i:04d}.docx").write_bytes(docx([paragraph(80) for _ in range(4)],
                                                         [["k", "v"], ["a", "1"], ["b", "2"]]))
        elif kind == "html":
            body = "".join(f"<p>{paragraph(90)}</p>" for _ in range(4))
            (root / f"doc{i:04d}.html").write_text(f"<html><body><h1>Page {i}</h1>{body}</body></html>")
        elif kind == "md":
            (root / f"doc{i:04d}.md").write_text(f"# Note {i}\n\n" + "\n\n".join(paragraph(90) for _ in range(4)))
        elif kind == "txt":
            (root / f"doc{i:04d}.txt").write_text("\n\n".join(paragraph(100) for _ in range(4)))
        elif kind == "scan":
            lines = [paragraph(8) for _ in range(12)]
            (root / f"doc{i:04d}.pdf").write_bytes(image_pdf([lines]))
        else:
            (root / f"doc{i:04d}.png").write_bytes(png(text_image([paragraph(8) for _ in range(8)], size=(1700, 1000))))
    return counts
