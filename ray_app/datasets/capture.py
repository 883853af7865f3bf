"""Captured conversations: with opt-in capture (a key's ``--capture``, or ``capture: true`` on a route;
off by default), each served chat's messages and its answer are appended to
``<data_dir>/captures/<UTC day>.jsonl``, with their provenance, for ``ray-app dataset build
--conversations`` to turn into training data."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["CaptureLog"]


class CaptureLog:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def write(self, messages: list[dict[str, Any]], answer: str, metadata: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        record = {"messages": [{"role": m.get("role"), "content": m.get("content")} for m in messages]
                  + [{"role": "assistant", "content": answer}],
                  "metadata": metadata | {"captured_at": int(time.time())}}
        path = self.root / f"{time.strftime('%Y-%m-%d', time.gmtime())}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # one write: whole lines
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
