"""What an ingest run did, file by file: JSON lines, one per file, with the reason for each refusal."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["indexed", "unchanged", "relabelled", "refused"]
RunStatus = Literal["complete", "partial", "failed"]


@dataclass
class FileOutcome:
    source: str
    path: str
    status: Status
    code: str | None = None  # refusal code (empty, corrupt, encrypted, ...)
    reason: str | None = None
    doc_id: str | None = None
    chunks: int = 0
    pages: int | None = None
    ocr_pages: int = 0
    sensitivity: str | None = None


@dataclass
class IngestReport:
    collection: str
    files: list[FileOutcome] = field(default_factory=list)
    seconds: float = 0.0
    first_result_s: float | None = None  # until the first file came out of the pipeline (start-up)

    def count(self, status: Status) -> int:
        return sum(f.status == status for f in self.files)

    @property
    def chunks(self) -> int:
        return sum(f.chunks for f in self.files)

    @property
    def pages(self) -> int:
        return sum(f.pages or 0 for f in self.files if f.status == "indexed")

    @property
    def status(self) -> RunStatus:
        if self.files and self.count("refused") == len(self.files):
            return "failed"
        return "partial" if self.count("refused") else "complete"

    def summary(self) -> dict:
        return {"collection": self.collection, "status": self.status, "files": len(self.files),
                "indexed": self.count("indexed"), "unchanged": self.count("unchanged"),
                "relabelled": self.count("relabelled"),
                "refused": self.count("refused"), "chunks": self.chunks, "pages": self.pages,
                "seconds": round(self.seconds, 2),
                "first_result_s": None if self.first_result_s is None else round(self.first_result_s, 2),
                "files_per_s": round(len(self.files) / self.seconds, 3) if self.seconds else None,
                "chunks_per_s": round(self.chunks / self.seconds, 3) if self.seconds else None}

    def write_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            for outcome in self.files:
                out.write(json.dumps(asdict(outcome)) + "\n")
        return path

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "partial": 2, "failed": 1}[self.status]
