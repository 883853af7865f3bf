"""Typed settings of the document side: ingestion (``configs/ingest.yaml``), chunking, OCR and the
vector store. The serving config reuses ``StoreConfig`` and ``OCRConfig`` so both sides read the same
collections the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from ray_app.cluster import ClusterShare
from ray_app.paths import DataDir
from ray_app.schema import Strict, load_yaml, parse
from ray_app.sensitivity import Sensitivity

__all__ = ["ChunkingConfig", "DocumentLimits", "IngestConfig", "OCRConfig", "Sensitivity", "SensitivityRule",
           "StageResources", "StoreConfig"]


class DocumentLimits(Strict):
    """What one document may make the parser and OCR do; over a limit, the file is refused with a code
    (``too_many_pages``, ``too_large``) and nothing else is affected. The defaults fit a 24 GiB machine."""

    max_pages: PositiveInt = Field(2000, description="PDF pages (and image frames) read from one document.")
    max_frames: PositiveInt = Field(100, description="Frames of a multi-frame image (TIFF, GIF).")
    max_page_pixels: PositiveInt = Field(
        40_000_000, description="Pixels of one rendered PDF page (at the OCR dpi) or one image frame; A1 at "
                                "200 dpi is 31 M.")
    max_inflated_bytes: PositiveInt = Field(
        256 * 1024 * 1024, description="Bytes a DOCX (a zip) may inflate to, all its members together.")
    max_archive_members: PositiveInt = Field(5000, description="Members of a DOCX zip.")
    max_chunks: PositiveInt = Field(20_000, description="Chunks one document may produce.")
    ocr_page_timeout_s: PositiveFloat = Field(120.0, description="Tesseract's time for one page.")


class ChunkingConfig(Strict):
    """Chunks are counted in tokens of the embedder's own tokenizer."""

    max_tokens: PositiveInt | None = Field(
        None, description="Tokens per chunk; default: what the embedder reads (its max sequence length, "
                          "less its special tokens), so no chunk is partly invisible to the dense vector.")
    overlap_tokens: int | None = Field(None, ge=0, description="Tokens shared by neighbours; default a quarter of max_tokens.")

    def resolve(self, embedder_max_tokens: int, special_tokens: int) -> tuple[int, int]:
        """(chunk tokens, overlap tokens) for an embedder that reads ``embedder_max_tokens``."""
        readable = embedder_max_tokens - special_tokens
        size = self.max_tokens or readable
        if size > readable:
            raise ValueError(f"chunking.max_tokens={size} exceeds what the embedder reads ({readable} tokens)")
        overlap = self.overlap_tokens if self.overlap_tokens is not None else size // 4
        if overlap >= size:
            raise ValueError(f"chunking.overlap_tokens={overlap} must be smaller than max_tokens={size}")
        return size, overlap


class OCRConfig(Strict):
    """Tesseract (Debian's tesseract-ocr), used for images and for PDF pages without a text layer."""

    languages: str = Field("eng", description="Tesseract language packs, e.g. 'eng' or 'eng+deu'.")
    psm: int = Field(3, ge=0, le=13, description="Tesseract page segmentation mode: 3 = automatic page layout; "
                                                 "11 = sparse text, no layout (forms, receipts).")
    dpi: PositiveInt = Field(200, description="Resolution PDF pages are rendered at before OCR.")
    min_text_chars: int = Field(
        16, ge=0, description="A PDF page whose text layer has fewer characters than this is OCR'd.")
    min_confidence: float = Field(0.0, ge=0, le=100, description="Words below this confidence (0-100) are dropped.")
    threads: PositiveInt = Field(1, description="OMP_THREAD_LIMIT for tesseract (1 was fastest per page here).")


class StoreConfig(Strict):
    """Where collections live: Qdrant's embedded engine (Edge) or a Qdrant server."""

    backend: Literal["edge", "qdrant"] = Field(
        "edge", description="edge: Qdrant Edge shards under <data_dir>/collections (one process writes). "
                            "qdrant: a Qdrant server through qdrant-client (multi-node clusters).")
    url: str | None = Field(None, description="Qdrant server URL, e.g. http://qdrant:6333 (backend qdrant).")
    path: str | None = Field(
        None, description="backend qdrant without url: qdrant-client's local mode in this folder (tests, small setups).")
    api_key_env: str | None = Field(None, description="Environment variable holding the Qdrant API key.")

    @model_validator(mode="after")
    def _check(self) -> "StoreConfig":
        if self.backend == "edge" and (self.url or self.path):
            raise ValueError("url/path are for backend: qdrant")
        if self.backend == "qdrant" and not (self.url or self.path):
            raise ValueError("backend qdrant needs a url (server) or a path (local mode)")
        return self


class StageResources(Strict):
    """Resources of one Ray Data stage (a task or actor pool)."""

    concurrency: PositiveInt = Field(1, description="Tasks/actors running the stage at once.")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: PositiveInt = Field(8, description="Rows per batch handed to the stage.")

    def map_batches_kwargs(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "batch_size": self.batch_size}


class SensitivityRule(Strict):
    pattern: str = Field(description="Glob on the path relative to the ingest root, e.g. 'hr/**' or '*.eml'.")
    sensitivity: Sensitivity


class IngestConfig(Strict):
    """An ingest run: ``ray-app ingest`` and ``jobs/ingest.py``."""

    data_dir: str | None = None
    embedder: str = Field("all-minilm-l6-v2", description="Embedder source: a prepared name, folder or HF id.")
    embedder_threads: PositiveInt | None = Field(
        2, description="torch threads per embedding actor (the node's cores / embed.concurrency).")
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    ocr: OCRConfig = Field(default_factory=OCRConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    max_file_bytes: PositiveInt = Field(50 * 1024 * 1024, description="Larger files are refused.")
    limits: DocumentLimits = Field(default_factory=DocumentLimits)
    cluster_share: ClusterShare = Field(
        "fit", description="fit: scale the stages' CPU requests to what the cluster has free (a laptop that also "
                           "serves); strict: keep them and wait (a cluster that autoscales).")
    default_sensitivity: Sensitivity = "internal"
    sensitivity_rules: list[SensitivityRule] = Field(
        default_factory=list, description="First matching rule wins; else the command's label, else the default.")
    parse: StageResources = Field(default_factory=lambda: StageResources(concurrency=2, num_cpus=0.5, batch_size=4))
    ocr_stage: StageResources = Field(default_factory=lambda: StageResources(concurrency=1, num_cpus=1, batch_size=4))
    # small batches: embedding starts as soon as a few documents are parsed, overlapping the parsers
    embed: StageResources = Field(default_factory=lambda: StageResources(concurrency=1, num_cpus=1, batch_size=8))

    @property
    def paths(self) -> DataDir:
        return DataDir.from_path(self.data_dir)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "IngestConfig":
        data = load_yaml(path) if path else {}
        return parse(cls, {**data, **(overrides or {})}, str(path or "ingest config"))
