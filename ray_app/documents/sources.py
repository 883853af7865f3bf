"""Where ingested files come from: a local folder or file, or an ``s3://`` prefix (pyarrow's S3
filesystem, with the standard AWS credential chain)."""

from __future__ import annotations

import fnmatch
import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

from ray_app.documents.config import IngestConfig, Sensitivity

DOC_NAMESPACE = uuid.UUID("2b0c9f44-0f3e-4f7e-9b62-7d8e1c5a4b90")


@dataclass(frozen=True)
class FileTask:
    uri: str  # file:///abs/path or s3://bucket/key: the document's identity
    rel_path: str  # path under the ingest root, for sensitivity rules and reports
    size: int
    sensitivity: Sensitivity

    @property
    def doc_id(self) -> str:
        return document_id(self.uri)


def document_id(uri: str) -> str:
    """A document's id: stable for its source URI (``file://``, ``s3://``, ``upload://<collection>/<name>``)."""
    return str(uuid.uuid5(DOC_NAMESPACE, uri))


def sensitivity_for(rel_path: str, config: IngestConfig, label: Sensitivity | None) -> Sensitivity:
    """The first matching per-folder rule wins, then the command's label, then the default."""
    for rule in config.sensitivity_rules:
        if fnmatch.fnmatch(rel_path, rule.pattern):
            return rule.sensitivity
    return label or config.default_sensitivity


def list_files(source: str, config: IngestConfig, label: Sensitivity | None = None) -> list[FileTask]:
    if source.startswith("s3://"):
        return _list_s3(source, config, label)
    root = Path(source).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
    base = root.parent if root.is_file() else root
    tasks = []
    for path in paths:
        rel = path.relative_to(base).as_posix()
        tasks.append(FileTask(path.as_uri(), rel, path.stat().st_size, sensitivity_for(rel, config, label)))
    return tasks


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_s3(source: str, config: IngestConfig, label: Sensitivity | None) -> list[FileTask]:
    from pyarrow import fs

    filesystem, prefix = fs.FileSystem.from_uri(source)
    infos = filesystem.get_file_info(fs.FileSelector(prefix, recursive=True))
    tasks = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != fs.FileType.File:
            continue
        rel = info.path[len(prefix):].lstrip("/") or info.base_name
        tasks.append(FileTask(f"s3://{info.path}", rel, info.size, sensitivity_for(rel, config, label)))
    return tasks


def read_bytes(uri: str) -> bytes:
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path)).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def content_hash(data: bytes, fingerprint: str) -> str:
    """Identifies a document version: its bytes plus the settings that shape its chunks."""
    return hashlib.sha256(fingerprint.encode() + b"\0" + data).hexdigest()[:32]
