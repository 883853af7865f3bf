"""Quality filters of a training set, each a plain function with a reason, applied in order:
structure, length, language, grounding in the source, exact duplicates, near duplicates.

Near duplicates are found with MinHash over character 5-grams and LSH banding (linear in the number
of records), then confirmed by the exact Jaccard similarity of the candidates' shingle sets.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_app.datasets.config import FilterConfig

__all__ = ["FilterReport", "Record", "apply_filters", "grounding", "is_english"]

_WORD = re.compile(r"[^\W\d_]+")
_STOPWORDS = frozenset(
    "the a an and or of to in on at for with by from is are was were be been it this that these those as not no "
    "you your we our they their he she his her its can will would should could do does did has have had what "
    "which who when where why how if then than there here all any some more most such into about over after".split())


@dataclass
class Record:
    kind: str  # pair | summary | conversation
    messages: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)  # provenance: doc_id, chunk, source, sensitivity, domain
    source: str | None = None  # the text the answer must be grounded in (None: not checked)

    @property
    def question(self) -> str:
        return next((m.get("content") or "" for m in reversed(self.messages) if m.get("role") == "user"), "")

    @property
    def answer(self) -> str:
        return next((m.get("content") or "" for m in reversed(self.messages) if m.get("role") == "assistant"), "")

    def training_line(self) -> dict[str, Any]:
        return {"messages": self.messages, "metadata": self.metadata}


@dataclass
class FilterReport:
    considered: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few removed records per filter, and why

    def drop(self, name: str, why: str) -> None:
        self.removed[name] = self.removed.get(name, 0) + 1
        shown = self.examples.setdefault(name, [])
        if len(shown) < 3:
            shown.append(why[:300])

    def kept_fraction(self) -> dict[str, float]:
        """For each filter, the share of what reached it that it kept."""
        left, out = self.considered, {}
        for name in FILTERS:
            removed = self.removed.get(name, 0)
            out[name] = round((left - removed) / left, 4) if left else 1.0
            left -= removed
        return out


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_english(text: str) -> bool:
    words = _words(text)
    if len(words) < 6:
        return True  # too short to tell
    return sum(w in _STOPWORDS for w in words) / len(words) >= 0.12


def grounding(answer: str, source: str) -> float:
    """The share of the answer's content words (not stopwords, 3+ letters) that appear in the source."""
    content = [w for w in _words(answer) if len(w) >= 3 and w not in _STOPWORDS]
    if not content:
        return 1.0
    vocabulary = set(_words(source))
    return sum(w in vocabulary for w in content) / len(content)


def _structure(r: Record) -> str | None:
    roles = [m.get("role") for m in r.messages]
    if "user" not in roles or roles[-1] != "assistant":
        return "not a user turn followed by an assistant answer"
    if not r.question.strip() or not r.answer.strip():
        return "an empty question or answer"
    return None


def _length(r: Record, c: FilterConfig) -> str | None:
    q, a = len(r.question.strip()), len(r.answer.strip())
    if not c.min_question_chars <= q <= c.max_question_chars and r.kind != "summary":
        return f"question of {q} characters (allowed {c.min_question_chars}-{c.max_question_chars})"
    if not c.min_answer_chars <= a <= c.max_answer_chars:
        return f"answer of {a} characters (allowed {c.min_answer_chars}-{c.max_answer_chars})"
    return None


def _language(r: Record, c: FilterConfig) -> str | None:
    if c.language == "en" and not (is_english(r.question) and is_english(r.answer)):
        return "not English"
    return None


def _grounded(r: Record, c: FilterConfig) -> str | None:
    if c.min_grounding <= 0 or r.source is None:
        return None
    share = grounding(r.answer, r.source)
    return None if share >= c.min_grounding else f"only {share:.0%} of the answer's words are in its source"


_TOKEN = re.compile(r"\w+")


def _normalised(r: Record) -> str:
    """What makes two records the same one: their words, numbers included, case and punctuation aside."""
    return " ".join(_TOKEN.findall(r.question.lower())) + "\x00" + " ".join(_TOKEN.findall(r.answer.lower()))


_PERMUTATIONS, _BANDS = 64, 16  # 16 bands of 4 rows: pairs above ~0.5 Jaccard collide in some band
_PRIME = (1 << 61) - 1
_rng = np.random.default_rng(20261201)
_A = _rng.integers(1, _PRIME, size=_PERMUTATIONS, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, size=_PERMUTATIONS, dtype=np.uint64)


def _shingles(text: str, k: int = 5) -> set[int]:
    text = " ".join(text.lower().split())
    grams = {text[i:i + k] for i in range(max(len(text) - k + 1, 1))}
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams}


def _minhash(shingles: set[int]) -> np.ndarray:
    values = np.fromiter(shingles, dtype=np.uint64, count=len(shingles)) % np.uint64(_PRIME)
    hashed = (values[None, :] * _A[:, None] + _B[:, None]) % np.uint64(_PRIME)
    return hashed.min(axis=1)


FILTERS = ("structure", "length", "language", "grounded", "duplicate", "near_duplicate")


def apply_filters(records: list[Record], config: FilterConfig) -> tuple[list[Record], FilterReport]:
    report = FilterReport(considered=len(records))
    checks = [("structure", _structure), ("length", lambda r: _length(r, config)),
              ("language", lambda r: _language(r, config)), ("grounded", lambda r: _grounded(r, config))]
    survivors = []
    for r in records:
        for name, check in checks:
            if (why := check(r)) is not None:
                report.drop(name, f"{why}: {r.question[:80]!r} -> {r.answer[:80]!r}")
                break
        else:
            survivors.append(r)
    seen, unique = set(), []
    for r in survivors:
        key = _normalised(r)
        if key in seen:
            report.drop("duplicate", f"the same as an earlier record: {r.question[:80]!r}")
            continue
        seen.add(key)
        unique.append(r)
    kept: list[Record] = []
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    shingle_sets: list[set[int]] = []
    rows = _PERMUTATIONS // _BANDS
    for r in unique:
        shingles = _shingles(r.question + " " + r.answer)
        signature = _minhash(shingles)
        candidates = {i for b in range(_BANDS) for i in buckets.get((b, signature[b * rows:(b + 1) * rows].tobytes()), [])}
        near = next((i for i in sorted(candidates)
                     if len(shingles & shingle_sets[i]) / max(len(shingles | shingle_sets[i]), 1)
                     >= config.near_duplicate_jaccard), None)
        if near is not None:
            report.drop("near_duplicate", f"{r.question[:80]!r} is close to {kept[near].question[:80]!r}")
            continue
        index = len(kept)
        kept.append(r)
        shingle_sets.append(shingles)
        for b in range(_BANDS):
            buckets[(b, signature[b * rows:(b + 1) * rows].tobytes())].append(index)
    report.kept = len(kept)
    return kept, report
