"""Detect personal data in prompt text: emails, phone numbers, payment cards and IBANs.

The router uses a hit to keep a request on local targets, so a false negative leaks data to a cloud
provider while a false positive only costs a cheaper route. Patterns are therefore broad, and numbers
are confirmed with their own check digits (Luhn for cards, mod-97 for IBANs) to keep order ids and
timestamps from tripping them. Findings carry the kind and span only: the value is never stored, so it
cannot end up in a log line or a reason string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["PII_KINDS", "PIIFinding", "PIIKind", "find_pii", "iban_valid", "luhn_valid"]

PIIKind = Literal["iban", "card", "email", "phone"]
# Checked in this order; a later kind overlapping an earlier finding is dropped (a card number also
# looks like a long phone number).
PII_KINDS: tuple[PIIKind, ...] = ("iban", "card", "email", "phone")


@dataclass(frozen=True)
class PIIFinding:
    kind: PIIKind
    start: int
    end: int


_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# 13-19 digits, single spaces or dashes between them; not part of a longer number, a decimal
# fraction or an international phone number.
_CARD = re.compile(r"(?<![\d+.,-])\d(?:[ -]?\d){12,18}(?![\d]|[.,]\d)")
# Country code, check digits, then 4-character groups (optionally spaced) and a short tail.
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?")
_PHONES = (
    # International: +CC then groups, e.g. +44 20 7946 0958, +1 (555) 123-4567, +4915112345678.
    (re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?!\d)"), 8, 15),
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567 (separators required).
    (re.compile(r"(?<![\w(])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?!\d)"), 10, 10),
    # National with trunk prefix 0: 020 7946 0958, 01 23 45 67 89, 07700900123.
    (re.compile(r"(?<![\w.,])0\d{1,4}(?:[ -]?\d{2,4}){1,4}(?![\d.,])"), 9, 12),
)

# Registered IBAN lengths for common countries; others are accepted at any length from 15 to 34.
_IBAN_LENGTHS = {
    "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24,
    "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27, "LI": 21,
    "LT": 20, "LU": 20, "LV": 21, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24,
    "SI": 19, "SK": 24, "TR": 26,
}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters -> 10..35, mod 97 == 1."""
    iban = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", iban):
        return False
    expected = _IBAN_LENGTHS.get(iban[:2])
    if expected is not None and len(iban) != expected:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _iban_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _IBAN.finditer(text):
        # The pattern can swallow a following word ("... 3000 AND"): try the longest valid prefix.
        positions = [m.start() + i for i, ch in enumerate(m.group()) if ch != " "]
        compact = m.group().replace(" ", "")
        for length in range(len(compact), 14, -1):
            if iban_valid(compact[:length]):
                spans.append((m.start(), positions[length - 1] + 1))
                break
    return spans


def _card_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            spans.append(m.span())
    return spans


def _phone_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for pattern, min_digits, max_digits in _PHONES:
        for m in pattern.finditer(text):
            if min_digits <= sum(ch.isdigit() for ch in m.group()) <= max_digits:
                spans.append(m.span())
    return spans


_FINDERS = {
    "iban": _iban_spans,
    "card": _card_spans,
    "email": lambda text: [m.span() for m in _EMAIL.finditer(text)],
    "phone": _phone_spans,
}


_DIGIT = re.compile(r"\d")


def find_pii(text: str, kinds: tuple[PIIKind, ...] = PII_KINDS) -> list[PIIFinding]:
    """Every PII finding in ``text``, ordered by position; overlapping findings keep the first kind."""
    findings: list[PIIFinding] = []
    # Cheap necessary conditions first: the patterns scan every position, which adds up on long prompts.
    has_digit, has_at = _DIGIT.search(text) is not None, "@" in text
    for kind in PII_KINDS:
        if kind not in kinds or (kind == "email" and not has_at) or (kind != "email" and not has_digit):
            continue
        for start, end in _FINDERS[kind](text):
            if not any(start < f.end and f.start < end for f in findings):
                findings.append(PIIFinding(kind, start, end))
    return sorted(findings, key=lambda f: f.start)
