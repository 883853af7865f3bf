"""What the routing policy needs to know about a chat request, extracted once from the request dict.

Everything here is a cheap heuristic on purpose: routing runs before every request and must not cost
a model call. Token counts are estimates that err high (a non-Latin character counts as a whole token),
since under-estimating would send a prompt to a target whose context window it overflows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ray_app.router.pii import PIIKind, request_strings, scan

__all__ = ["CONFIDENTIAL_HEADER", "RequestFeatures", "detect_tasks", "estimate_tokens", "extract_features",
           "message_text"]

# A client marks a request confidential with this header set to 1/true/yes.
CONFIDENTIAL_HEADER = "x-confidential"
_MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per message in chat templates
# Tasks are read from the head and tail of long prompts (where the ask is); PII is always scanned in full.
_TASK_SCAN_CHARS = 4_000

_CODE = re.compile(
    r"```|^\s*(?:def|class)\s+\w+|^\s*(?:import|from)\s+[\w.]+|#include\s*<|Traceback \(most recent call last\)"
    r"|^\s*(?:function|public|private|fn|func)\s+\w+", re.MULTILINE)
_CODE_LINE_END = re.compile(r"[{};]\s*$", re.MULTILINE)
# No "/" (dates) and no "$...$" (prices): both are common outside maths.
_DIGIT = re.compile(r"\d")
_MATH_LATEX = re.compile(r"\\(?:frac|int|sum|sqrt|lim|partial)\b")
_MATH_ARITHMETIC = re.compile(r"\b\d+\s*[+*^=×÷]\s*\d+")
_MATH_WORDS = frozenset({"solve", "integral", "integrate", "derivative", "differentiate", "equation", "prove",
                         "theorem", "lemma", "probability", "matrix"})
_SUMMARIZE = re.compile(r"\b(?:summari[sz]e|summary|tl;?dr|key points|condense|recap)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+")
_ENGLISH = frozenset({
    "the", "and", "is", "are", "was", "were", "of", "to", "in", "that", "it", "for", "with", "on", "this",
    "you", "be", "have", "not", "what", "how", "why", "please", "can", "could", "would", "should",
})
# Frequent function words of other Latin-script languages that are not also English words.
_OTHER = frozenset({
    # es
    "de", "la", "el", "los", "las", "del", "por", "para", "una", "que", "es", "está", "y", "pero", "como", "muy",
    # fr
    "le", "les", "des", "du", "une", "est", "et", "avec", "pour", "dans", "sur", "pas", "vous", "nous", "qui",
    # de
    "der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "für", "auf", "ich", "sie", "wir", "zu", "von",
    # it, pt, nl
    "il", "della", "che", "sono", "non", "per", "gli", "questo", "anche", "o", "os", "da", "não", "em", "um", "uma",
    "com", "você", "het", "een", "van", "en", "niet", "dat", "zijn", "voor", "ik", "je",
}) - _ENGLISH


@dataclass(frozen=True)
class RequestFeatures:
    route: str | None  # the route the client asked for (``model``), None for the default
    prompt_tokens: int  # estimated
    max_tokens: int  # requested, or the policy default
    tasks: frozenset[str]  # capabilities the request needs beyond chat: code, math, summarize, multilingual
    pii: frozenset[PIIKind] = frozenset()  # kinds found, never values
    confidential_header: bool = False
    confidential_key: bool = False
    confidential_context: bool = False  # a retrieved chunk is labelled confidential
    stream: bool = False
    n: int = 1  # choices asked for: completion tokens are up to n x max_tokens
    max_request_usd: float | None = None  # the caller's per-request cost ceiling
    tools: bool = False  # the request offers tools the model may call (tool_choice other than none)

    @property
    def local_only(self) -> bool:
        return self.confidential_header or self.confidential_key or self.confidential_context or bool(self.pii)

    def privacy_reasons(self) -> list[str]:
        reasons = []
        if self.confidential_header:
            reasons.append(f"request marked confidential ({CONFIDENTIAL_HEADER} header)")
        if self.confidential_key:
            reasons.append("API key is confidential")
        if self.confidential_context:
            reasons.append("retrieved context includes a confidential chunk")
        if self.pii:
            reasons.append(f"prompt contains PII ({', '.join(sorted(self.pii))})")
        return reasons


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a chat message: its content (a string or parts of any type) and its tool calls."""
    content = message.get("content")
    if isinstance(content, str) and not message.get("tool_calls"):
        return content
    return "\n".join(request_strings([content, message.get("tool_calls")]))


def estimate_tokens(text: str, chars_per_token: float = 4.0) -> int:
    non_ascii = 0 if text.isascii() else sum(1 for ch in text if ord(ch) > 127)
    return int((len(text) - non_ascii) / chars_per_token) + non_ascii + 1


def _non_english(text: str, words: list[str]) -> bool:
    if not text.isascii():
        letters = [ch for ch in text if ch.isalpha()]
        # Mostly non-Latin script (CJK, Cyrillic, Arabic, ...): Latin letters are all below U+0250.
        if letters and sum(ord(ch) >= 0x250 for ch in letters) / len(letters) > 0.3:
            return True
    english = sum(w in _ENGLISH for w in words)
    other = sum(w in _OTHER for w in words)
    return other >= 2 and other > english


def detect_tasks(text: str) -> frozenset[str]:
    """Capabilities a prompt asks for, beyond plain chat."""
    if len(text) > _TASK_SCAN_CHARS:
        # The ask is at the start or the end; scanning a pasted book in between costs time on every request.
        half = _TASK_SCAN_CHARS // 2
        text = text[:half] + "\n" + text[-half:]
    tasks = set()
    words = _WORD.findall(text.lower())
    if _CODE.search(text) or len(_CODE_LINE_END.findall(text)) >= 2:
        tasks.add("code")
    if (_MATH_WORDS.intersection(words) or ("\\" in text and _MATH_LATEX.search(text))
            or (_DIGIT.search(text) and _MATH_ARITHMETIC.search(text))):
        tasks.add("math")
    if _SUMMARIZE.search(text):
        tasks.add("summarize")
    if _non_english(text, words):
        tasks.add("multilingual")
    return frozenset(tasks)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def extract_features(request: Mapping[str, Any], *, headers: Mapping[str, str] | None = None,
                     confidential_key: bool = False, retrieved_sensitivities: Iterable[str] = (),
                     default_max_tokens: int = 512, chars_per_token: float = 4.0,
                     max_request_usd: float | None = None) -> RequestFeatures:
    """Features of an OpenAI chat request dict.

    ``retrieved_sensitivities`` are the labels of chunks a RAG step put into the prompt. Every string
    of the request is scanned for PII (every turn, tool definitions, tool calls and results, names,
    extra fields), since all of it would reach the target.
    """
    messages = request.get("messages") or []
    texts = [message_text(m) for m in messages]
    user_text = "\n".join(t for m, t in zip(messages, texts) if m.get("role") == "user")
    prompt_tokens = sum(estimate_tokens(t, chars_per_token) + _MESSAGE_OVERHEAD_TOKENS for t in texts)
    if request.get("tools"):
        prompt_tokens += estimate_tokens("\n".join(request_strings(request["tools"])), chars_per_token)
    max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or default_max_tokens
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    return RequestFeatures(
        route=request.get("model") or None,
        prompt_tokens=prompt_tokens,
        max_tokens=int(max_tokens),
        tasks=detect_tasks(user_text),
        pii=scan(request_strings(request)),
        confidential_header=_truthy(headers.get(CONFIDENTIAL_HEADER)),
        confidential_key=confidential_key,
        confidential_context=any(s == "confidential" for s in retrieved_sensitivities),
        stream=bool(request.get("stream")),
        n=int(request.get("n") or 1),
        max_request_usd=max_request_usd,
        tools=bool(request.get("tools")) and request.get("tool_choice") != "none",
    )
