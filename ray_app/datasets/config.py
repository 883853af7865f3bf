"""The typed settings of a dataset build: ``configs/dataset.yaml`` is an instance of ``DatasetConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, NonNegativeFloat, PositiveInt

from ray_app.cluster import ClusterShare
from ray_app.documents.config import StoreConfig
from ray_app.paths import DataDir
from ray_app.schema import Strict, load_yaml, parse

__all__ = ["DatasetConfig", "DomainRule", "FilterConfig", "TeacherConfig"]


class DomainRule(Strict):
    """A domain and how to recognise it: whole-word keywords, each match one point."""

    keywords: list[str] = Field(default_factory=list)
    min_score: PositiveInt = Field(2, description="Keyword hits a document needs to be in this domain.")


def _default_domains() -> dict[str, DomainRule]:
    return {
        "technical": DomainRule(keywords=["api", "server", "database", "software", "install", "configure", "network",
                                          "password", "login", "deploy", "cluster", "error", "code", "version"]),
        "legal": DomainRule(keywords=["contract", "clause", "agreement", "liability", "warranty", "jurisdiction",
                                      "terms", "compliance", "regulation", "law", "legal", "court", "party"]),
        "medical": DomainRule(keywords=["patient", "diagnosis", "treatment", "clinical", "symptom", "dose",
                                        "medication", "therapy", "hospital", "disease", "medical", "health"]),
        "financial": DomainRule(keywords=["invoice", "payment", "budget", "revenue", "tax", "account", "salary",
                                          "expense", "refund", "price", "cost", "billing", "euros", "dollars"]),
    }


class TeacherConfig(Strict):
    """The model that writes summaries and instruction pairs, reached over the server's OpenAI API.

    A served model (the local default) or a route (``auto``, ``best``): requests for chunks labelled
    confidential carry ``X-Confidential: true``, so the router never sends them to a cloud target.
    """

    model: str = Field("smollm2-135m-instruct", description="A served model or a route name.")
    endpoint: str = Field("http://127.0.0.1:8000/v1", description="The server's /v1 URL.")
    api_key_env: str | None = Field("RAY_APP_API_KEY", description="Environment variable with an rk- key (keys mode).")
    temperature: NonNegativeFloat = 0.0
    seed: int = 0
    summary_max_tokens: PositiveInt = 96
    pair_max_tokens: PositiveInt = 256
    concurrency: PositiveInt = Field(4, description="Requests each teacher stage keeps in flight.")
    timeout_s: PositiveInt = 300
    summary_source_chars: PositiveInt = Field(2000, description="Text of a document its summary is written from.")


class FilterConfig(Strict):
    min_question_chars: PositiveInt = 8
    max_question_chars: PositiveInt = 500
    min_answer_chars: PositiveInt = 2
    max_answer_chars: PositiveInt = 2000
    near_duplicate_jaccard: float = Field(0.8, ge=0, le=1, description="Character 5-gram Jaccard (MinHash) at "
                                                                         "or above which a pair is a near duplicate.")
    language: str | None = Field("en", description="Keep English records (stopword ratio); None: any language.")
    min_grounding: float = Field(0.5, ge=0, le=1, description="Share of the answer's content words found in its "
                                                              "source; 0 turns the check off.")


class DatasetConfig(Strict):
    data_dir: str | None = None
    store: StoreConfig = Field(default_factory=StoreConfig, description="Where the collections live (as in ingest).")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    domains: dict[str, DomainRule] = Field(default_factory=_default_domains,
                                           description="Domains besides `general` (documents matching none).")
    pairs_per_chunk: PositiveInt = 1
    summaries: bool = Field(True, description="A summary per document, also as a training record.")
    system_prompt: str | None = Field(None, description="A system message for every record; default: none.")
    filters: FilterConfig = Field(default_factory=FilterConfig)
    max_chunks: PositiveInt = Field(20_000, description="Chunks read from the collection at most.")
    cluster_share: ClusterShare = "fit"

    @property
    def paths(self) -> DataDir:
        return DataDir.from_path(self.data_dir)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DatasetConfig:
        document = load_yaml(path) if path else {}
        for dotted, value in (overrides or {}).items():
            target = document
            *parents, leaf = dotted.split(".")
            for key in parents:
                target = target.setdefault(key, {})
            target[leaf] = value
        return parse(cls, document, str(path or "dataset config"))
