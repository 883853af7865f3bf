"""``/v1/files``: uploaded training files, stored under the data directory with their metadata in
SQLite, so they survive a server restart.

A ``fine-tune`` file is checked when it is uploaded, line by line, the way OpenAI's API does it: each
line one JSON object in the chat format (``{"messages": [...]}``, with ``tools``, ``tool_calls`` and
``tool`` messages for function calling) read by the trainer's own parser (``training.data.parse_record``). A file with no usable line is refused (400) naming
the first bad one; a file with some bad lines is kept, and its listing says which (the trainer skips
them too).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["FileRecord", "FileStore", "LineProblem", "TrainingFileError", "check_training_lines"]

Purpose = Literal["fine-tune", "assistants", "batch", "user_data"]
PURPOSES = ("fine-tune", "assistants", "batch", "user_data")


@dataclass(frozen=True)
class LineProblem:
    line: int  # 1-based
    problem: str


class TrainingFileError(ValueError):
    def __init__(self, message: str, problems: list[LineProblem]):
        super().__init__(message)
        self.problems = problems


def _line_problem(record: Any) -> str | None:
    # the trainer's own reading of a line: what is refused here is exactly what it could not train on
    from ray_app.training.data import parse_record

    try:
        parse_record(record)
    except ValueError as e:
        return str(e)
    return None


def check_training_lines(data: bytes, max_lines: int = 1_000_000) -> tuple[int, list[LineProblem]]:
    """(usable lines, problems); raises ``TrainingFileError`` when no line is usable."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingFileError(f"the file is not UTF-8 (byte {e.start})", []) from None
    usable, problems = 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if number > max_lines:
            raise TrainingFileError(f"more than {max_lines} lines", problems)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(LineProblem(number, f"not valid JSON ({e.msg})"))
            continue
        if (problem := _line_problem(record)) is not None:
            problems.append(LineProblem(number, problem))
            continue
        usable += 1
    if usable == 0:
        first = problems[0] if problems else None
        where = f": line {first.line}: {first.problem}" if first else ": the file is empty"
        raise TrainingFileError(f"no usable training example{where}", problems)
    return usable, problems


@dataclass(frozen=True)
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    lines: int = 0  # usable training examples (fine-tune files)
    problems: list[LineProblem] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        body = {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None}
        if self.purpose == "fine-tune":
            body["status_details"] = (None if not self.problems else
                                      f"{len(self.problems)} line(s) skipped: " + "; ".join(
                                          f"line {p.line}: {p.problem}" for p in self.problems[:5]))
        return body


class FileStore:
    """Files under ``root`` (one per id), their metadata in ``root/files.sqlite``."""

    def __init__(self, root: Path, max_bytes: int = 512 * 1024 * 1024):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "files.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, filename TEXT NOT NULL,
                            purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
                            lines INTEGER NOT NULL, problems TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0)""")

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.bin"

    def create(self, filename: str, purpose: str, data: bytes) -> FileRecord:
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}")
        if len(data) > self.max_bytes:
            raise ValueError(f"{len(data)} bytes is over the limit of {self.max_bytes} bytes")
        lines, problems = check_training_lines(data) if purpose == "fine-tune" else (0, [])
        record = FileRecord(f"file-{secrets.token_hex(12)}", filename[:256], purpose, len(data), int(time.time()),
                            lines, problems)
        target = self.path(record.id)
        partial = target.with_suffix(".part")
        partial.write_bytes(data)
        partial.rename(target)  # whole or not at all
        with self._lock:
            self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                             (record.id, record.filename, record.purpose, record.bytes, record.created_at,
                              record.lines, json.dumps([p.__dict__ for p in problems[:100]])))
        return record

    def get(self, file_id: str) -> FileRecord | None:
        with self._lock:
            row = self._db.execute("SELECT id, filename, purpose, bytes, created_at, lines, problems FROM files "
                                   "WHERE id = ? AND deleted = 0", (file_id,)).fetchone()
        return _record(row) if row else None

    def list(self, purpose: str | None = None, limit: int = 10_000, after: str | None = None) -> list[FileRecord]:
        query = "SELECT id, filename, purpose, bytes, created_at, lines, problems FROM files WHERE deleted = 0"
        params: list[Any] = []
        if purpose:
            query += " AND purpose = ?"
            params.append(purpose)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at DESC, id DESC", params).fetchall()
        records = [_record(r) for r in rows]
        if after is not None:
            ids = [r.id for r in records]
            records = records[ids.index(after) + 1:] if after in ids else []
        return records[:limit]

    def content(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def delete(self, file_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0", (file_id,))
        if cursor.rowcount:
            self.path(file_id).unlink(missing_ok=True)
        return bool(cursor.rowcount)


def _record(row) -> FileRecord:
    file_id, filename, purpose, size, created_at, lines, problems = row
    return FileRecord(file_id, filename, purpose, size, created_at, lines,
                      [LineProblem(**p) for p in json.loads(problems)])
