"""What a training run says while it runs: its events (OpenAI's ``fine_tuning.job.event``) and its
status, as files in the job's folder that the run (its loop on every step) writes and the fine-tuning
API reads.

Events are JSON lines appended one ``write`` each (whole lines even when the API's process and the
job's process append at once); the status is one JSON file replaced atomically.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Literal

__all__ = ["EventLog", "StatusFile"]

Level = Literal["info", "warn", "error"]


class EventLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, message: str, level: Level = "info", data: dict[str, Any] | None = None,
            kind: Literal["message", "metrics", "checkpoint"] = "message") -> dict[str, Any]:
        event = {"object": "fine_tuning.job.event", "id": f"ftevent-{secrets.token_hex(10)}",
                 "created_at": int(time.time()), "level": level, "message": message, "data": data or {},
                 "type": kind}
        line = (json.dumps(event) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return event

    def read(self) -> list[dict[str, Any]]:
        """Every event, oldest first."""
        if not self.path.is_file():
            return []
        events = []
        for line in self.path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                continue
        return events


class StatusFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, status: str, **fields: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, "at": int(time.time()), **fields}))
        tmp.replace(self.path)

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
